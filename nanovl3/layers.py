"""Blocks shared by the vision encoder and the language model: RMSNorm and stochastic depth."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps) in fp32, cast back before the weight (as Qwen2 does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        # F.rms_norm: fewer dispatches than spelled out, bit-identical to x * rsqrt(mean(x^2) + eps)
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def drop_path_rates(rate: float, n: int) -> list[float]:
    """Stochastic depth per block, linear in depth: 0 at the first block, `rate` at the last."""
    return [rate * i / max(n - 1, 1) for i in range(n)]


def drop_path(x, p: float, training: bool):
    """Stochastic depth: drop each sample's residual branch with probability p (training only)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)
