"""
Training losses.

    loss = lm_loss(logits, batch["labels"], batch["loss_weight"])     # pre-training / SFT, SPEC §6.3

Label convention (as in data.py): labels[b, t] is the target of token t, predicted from position t-1, so the loss
pairs logits[:, :-1] with labels[:, 1:]; a weight tensor is aligned with labels and shifted the same way.

Shapes: B batch, T tokens, V vocabulary.
References: InternVL2.5 (arXiv 2412.05271) §4.3 / InternVL3 (arXiv 2504.10479) eq. 7 (token, sample and square
averaging); upstream OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py
(forward with loss_weight and loss_reduction_all_gather).
Tests: python -m pytest -q tests/test_data.py
"""

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a token that gets no loss

# -----------------------------------------------------------------------------
# language modelling (next-token cross-entropy)


def loss_weight_sum(labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The denominator lm_loss uses: Σ w over the shifted, supervised positions (a 0-dim fp32 tensor).

    With weights=None every supervised token counts 1 (so this is the number of supervised tokens).
    """
    mask = (labels[:, 1:] != IGNORE).float()  # [B,T-1]
    if weights is not None:
        mask = mask * weights[:, 1:].float()
    return mask.sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
            denom: torch.Tensor | float | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits [B,T,V], labels [B,T] (IGNORE = no loss), weights [B,T] or None -> scalar.

    Without weights: the mean CE over supervised tokens (token averaging).
    With weights (data.loss_weights, per sample): Σ_t w_t·CE_t / Σ_t w_t (SPEC §6.3).
    denom replaces Σ_t w_t: under DDP with loss_reduction_all_gather, pass the per-rank loss_weight_sum averaged
    over ranks (all_reduce AVG). DDP then averages gradients over ranks, so the step minimises
    Σ_all ranks w·CE / Σ_all ranks w, one global weighted mean instead of a mean of per-rank means.
    A batch without any supervised token gives an exact 0 that still has a grad_fn (never NaN), so backward and
    DDP's gradient all-reduce run as usual.
    """
    V = logits.size(-1)
    logits = logits[:, :-1].float()  # [B,T-1,V]: position t predicts token t+1; CE in fp32
    targets = labels[:, 1:]  # [B,T-1]
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    w = (targets != IGNORE).float()  # [B,T-1]
    if weights is not None:
        w = w * weights[:, 1:].float()
    if denom is None:
        denom = w.sum()
    # ignored positions have ce = 0 and w = 0, so with nothing supervised this is 0 / eps = 0 (no host sync)
    return (ce * w.reshape(-1)).sum() / torch.as_tensor(denom, dtype=torch.float32, device=ce.device).clamp(min=1e-12)


# -----------------------------------------------------------------------------
# ---- MPO
