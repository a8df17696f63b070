"""
InternViT, InternVL3's vision encoder (InternViT-300M-448px-V2_5; the 6B variant by config flags).

A plain pre-norm ViT with a CLS token, learned absolute position embeddings, and layer scale
(InternVL 1.5 §3.1, arXiv 2404.16821; InternVL2.5's model architecture, arXiv 2412.05271).
Upstream: OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py.
Names as in the released checkpoint (`vision_model.embeddings.class_embedding`, `ls1`, ...).
Shapes: N tiles, P patches per tile (32x32 = 1024 at 448 px), C hidden size, H heads, D head dim."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovl3.attention import attention
from nanovl3.config import VisionConfig
from nanovl3.layers import RMSNorm, drop_path, drop_path_rates


def make_norm(cfg: VisionConfig, dim: int) -> nn.Module:
    return (RMSNorm if cfg.norm_type == "rms_norm" else nn.LayerNorm)(dim, cfg.layer_norm_eps)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size  # 32 for 448 px tiles
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid,
                                                           cfg.hidden_size))

    def patch_positions(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings of an h x w patch grid: the stored 32x32 grid resized bicubically
        (InternViT's `_get_pos_embed`), skipped at the native grid (an exact identity there)."""
        pos = self.position_embedding[:, 1:]  # [1, G*G, C]
        if (h, w) == (self.grid, self.grid):
            return pos
        C = pos.size(-1)
        pos = pos.reshape(1, self.grid, self.grid, C).permute(0, 3, 1, 2)  # [1, C, G, G]
        pos = F.interpolate(pos.float(), size=(h, w), mode="bicubic",
                            align_corners=False)  # [1, C, h, w]
        return (pos.reshape(1, C, h * w).permute(0, 2, 1)
                .to(self.position_embedding.dtype))  # [1, h*w, C]

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, C, h, w]
        N, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, C], row-major over the patch grid
        x = torch.cat([self.class_embedding.expand(N, 1, C), x], dim=1)  # [N, 1+P, C]
        pos = torch.cat([self.position_embedding[:, :1], self.patch_positions(h, w)],
                        dim=1)  # [1, 1+P, C]
        return x + pos


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        C = cfg.hidden_size
        self.qkv = nn.Linear(C, 3 * C, bias=cfg.qkv_bias)  # rows ordered [q; k; v]
        self.proj = nn.Linear(C, C)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:  # 6B ViT: q, k normalised over all heads before the split
            self.q_norm = RMSNorm(C, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(C, cfg.layer_norm_eps)

    def forward(self, x):
        N, P, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # 3 x [N, P, C]
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        D = C // self.n_head
        q, k, v = (t.view(N, P, self.n_head, D).transpose(1, 2) for t in (q, k, v))  # [N, H, P, D]
        y = attention(q, k, v, mask=None)  # bidirectional: every patch sees every patch
        return self.proj(y.transpose(1, 2).reshape(N, P, C))  # [N, P, C]


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU, not the tanh approximation


class VisionBlock(nn.Module):
    """h = h + ls1 * Attn(norm1(h)); h = h + ls2 * MLP(norm2(h)) -- pre-norm with layer scale."""

    def __init__(self, cfg: VisionConfig, drop_path_rate: float):
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.hidden_size)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(cfg.initializer_factor * torch.ones(cfg.hidden_size))
        self.norm2 = make_norm(cfg, cfg.hidden_size)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(cfg.initializer_factor * torch.ones(cfg.hidden_size))
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)) * self.ls1, self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)) * self.ls2, self.drop_path_rate, self.training)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        rates = drop_path_rates(cfg.drop_path_rate, cfg.num_hidden_layers)
        self.layers = nn.ModuleList([VisionBlock(cfg, r) for r in rates])


class InternViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        # no final norm (InternViT has none): the output is the selected block's raw residual stream

    def forward(self, pixel_values, select_layer: int = -1):
        """pixel_values [N,3,S,S] -> hidden states [N,1+P,C] of `select_layer` (-1 = last block).
        Layers are indexed like the reference: [embeddings, block 1, ..., block L]; blocks past the
        selected one are skipped."""
        x = self.embeddings(pixel_values)
        n = len(self.encoder.layers)
        stop = select_layer % (n + 1)  # -1 -> n blocks, 0 -> embeddings only
        for block in self.encoder.layers[:stop]:
            x = block(x)
        return x
