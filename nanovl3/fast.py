"""
CPU inference speed paths, opt-in: `speed_up(model)` makes the model's nn.Linear layers FastLinear
in place (training and GPUs keep the plain product); generate() opts in, the model files don't.

A decode step on a CPU is a chain of matrix-vector products, where stock PyTorch is slow:
  bf16   multiply by a copy of the weight pre-packed into oneDNN's blocked layout (what Inductor's
         `freezing` does for compiled code), bit-identical to F.linear;
  fp32   one row times a weight runs on one core in MKL: split the weight's rows into a block per
         thread, all in one batched call that runs a block per core (compiled decode steps too);
  fused  layers that read the same x (q/k/v, gate/up) run as ONE product with their concatenated,
         pre-packed weights (bf16): fewer, larger oneDNN calls.
bench.py measures each (decode, its matrix-vector floor, prefill) against transformers.
Why private calls (torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise, as in Inductor's
freezing): compiling the 1B-shape bf16 decode step with freezing ran slower than this eager path.
Tests: python -m pytest -q tests/test_generate.py"""

import torch
import torch.nn as nn
import torch.nn.functional as F

_PACKED_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@torch.compiler.assume_constant_result
def _threads() -> int:
    """CPU threads, a constant to torch.compile (tracing torch.get_num_threads breaks the graph)."""
    return torch.get_num_threads()


def _packs(w: torch.Tensor) -> bool:
    """Whether a product with weight w takes the pre-packed oneDNN path: eager bf16 inference on a
    CPU that has it (in compiled code Inductor's freezing packs the weights itself)."""
    return (_PACKED_BF16 and w.dtype == torch.bfloat16 and w.device.type == "cpu"
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def _packed(owner, key: tuple, weight_fn):
    """owner's pre-packed copy of weight_fn(), rebuilt when `key` (data pointers and versions of the
    weights it is made of) changes: an optimizer step makes a new version."""
    if getattr(owner, "_packed_key", None) != key:
        owner._packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight_fn(), 1)
        owner._packed_key = key
    return owner._packed_weight


def _linear(layer: nn.Linear, x):
    """layer(x) on the fastest path this input and weight allow."""
    w, b = layer.weight, layer.bias
    if _packs(w):
        packed = _packed(layer, (w.data_ptr(), w._version), lambda: w)
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    if w.device.type != "cpu" or torch.is_grad_enabled():
        return F.linear(x, w, b)
    n, (N, K) = _threads(), w.shape
    if w.dtype == torch.float32 and x.numel() == K and n > 1 and N % n == 0:  # one row, fp32
        blocks = w.view(n, N // n, K).transpose(1, 2)  # [n, K, N/n]
        x1 = x.reshape(1, 1, K).expand(n, 1, K)  # [n, 1, K]: the same row for every block
        y = torch.bmm(x1, blocks) if b is None else torch.baddbmm(b.view(n, 1, N // n), x1, blocks)
        return y.view(*x.shape[:-1], N)  # y [n, 1, N/n]: the blocks side by side
    return F.linear(x, w, b)


class Fused:
    """Linear layers that read the same x, in call order (q, k, v or gate, up): the first one's call
    runs one product for all of them; each later one takes its part when called with that same x."""

    def __init__(self, layers: list[nn.Linear]):
        self.layers, self.x, self.parts = layers, None, []

    def __call__(self, layer: nn.Linear, x):
        i = next(i for i, other in enumerate(self.layers) if other is layer)
        if i == 0:
            self.x, self.parts = x, self.product(x)
        elif x is not self.x:  # called on its own: the plain product
            return _linear(layer, x)
        out = self.parts[i]
        if i == len(self.layers) - 1:
            self.x, self.parts = None, []
        return out

    def product(self, x) -> list:
        layers = self.layers
        key = tuple((m.weight.data_ptr(), m.weight._version) for m in layers)
        bias = None
        if layers[0].bias is not None:  # the joined bias is a copy too: rebuilt when one changes
            key += tuple(m.bias._version for m in layers)
            if getattr(self, "_bias_key", None) != key:
                self._bias, self._bias_key = torch.cat([m.bias for m in layers]), key
            bias = self._bias
        packed = _packed(self, key, lambda: torch.cat([m.weight for m in layers]))  # [sum of N, K]
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # [..., sum of N]
        return list(y.split([m.out_features for m in layers], dim=-1))

    def __getstate__(self):  # pickle/deepcopy: skip packed caches (oneDNN tensors can't be copied)
        return {"layers": self.layers, "x": None, "parts": []}


class FastLinear(nn.Linear):
    """nn.Linear on the paths above; `fused`: the Fused group of layers it shares its input with."""
    fused: Fused | None = None

    def forward(self, x):
        if self.fused is not None and _packs(self.weight):
            return self.fused(self, x)
        return _linear(self, x)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_packed")}


def speed_up(model: nn.Module) -> nn.Module:
    """Opt a built model into the CPU inference speed paths, in place (idempotent); returns it."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
    for module in model.modules():
        for names in [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]:
            layers = [getattr(module, n, None) for n in names]
            if all(isinstance(m, FastLinear) for m in layers) and layers[0].fused is None:
                group = Fused(layers)
                for m in layers:
                    m.fused = group
    return model
