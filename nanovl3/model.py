"""
InternVL3 = InternViT -> pixel unshuffle -> MLP -> Qwen2, "ViT-MLP-LLM" (arXiv 2504.10479 §2.1).

    tiles [N,3,S,S] --InternViT--> [N,1+P,Cv] --drop CLS, unshuffle 2x2--> [N,P/4,4Cv]
        --mlp1--> [N,P/4,C]
    text ids [B,T] --embed--> [B,T,C]; <IMG_CONTEXT> rows replaced, in order, by the visual rows
        --Qwen2--> logits [B,T,V]

Also here: V2PE position ids, the one place the paper's variable visual position encoding lives.
Upstream: OpenGVLab/InternVL modeling_internvl_chat.py, transformers' modeling_internvl.py."""

import math

import torch
import torch.nn as nn

from nanovl3 import checkpoint
from nanovl3.attention import Mask, causal_mask
from nanovl3.common import UserError
from nanovl3.config import VLConfig
from nanovl3.text import KVCache, Qwen2
from nanovl3.vision import InternViT

# -----------------------------------------------------------------------------
# the glue: pixel unshuffle and the projector

def pixel_unshuffle(x: torch.Tensor, ps_version: str = "v2") -> torch.Tensor:
    """2x2 blocks of patch tokens -> one token of 4x the channels (InternVL's `pixel_shuffle`, 0.5).
    x [N, h, w, C] (h = patch row, w = patch column) -> [N, h/2, w/2, 4C]. With ps_version v2 the
    output token (i, j) holds concat(x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]): top-left,
    top-right, bottom-left, bottom-right. v1 leaves the grid transposed."""
    N, h, w, C = x.shape
    x = x.reshape(N, h, w // 2, 2 * C)  # [N, h, w/2, 2C]: horizontal pairs merged
    x = x.permute(0, 2, 1, 3)  # [N, w/2, h, 2C]
    x = x.reshape(N, w // 2, h // 2, 4 * C)  # [N, w/2, h/2, 4C]: vertical pairs merged
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3)  # [N, h/2, w/2, 4C]: back to row-major
    return x.contiguous()


def make_projector(cfg: VLConfig) -> nn.Sequential:
    """`mlp1`: LayerNorm(4Cv) -> Linear(4Cv, C) -> GELU (index 2, no weights) -> Linear(C, C)."""
    c_in = cfg.vision.hidden_size * int(1 / cfg.downsample_ratio) ** 2
    c = cfg.text.hidden_size
    return nn.Sequential(nn.LayerNorm(c_in, eps=1e-5), nn.Linear(c_in, c), nn.GELU(),
                         nn.Linear(c, c))


# -----------------------------------------------------------------------------
# V2PE (InternVL3 §2.1, V2PE arXiv 2412.09616)
V2PE_DELTAS = [1 / 2 ** k for k in range(9)]  # training: δ per image from {1, 1/2, ..., 1/256}


def count_images(input_ids: torch.Tensor, image_token_id: int) -> int:
    """Images in a sequence [T]: runs of consecutive <IMG_CONTEXT> tokens."""
    is_img = input_ids == image_token_id
    return int(is_img[0]) + int((is_img[1:] & ~is_img[:-1]).sum()) if len(is_img) else 0


def v2pe_position_ids(input_ids: torch.Tensor, image_token_id: int,
                      deltas: list[float] | float) -> torch.Tensor:
    """Positions of one sequence, input_ids [T] -> float [T]; a δ per image, or a float for all.
    "p_i = p_{i-1} + 1 if x_i is a text token, p_{i-1} + δ if x_i is a visual token", δ constant
    within an image (image k uses deltas[k]). As in OpenGVLab/V2PE get_rope_pos_id, the first text
    token after an image resumes at ceil(last visual position) + 1. All δ = 1 gives 0, ..., T-1."""
    if isinstance(deltas, (int, float)):  # one δ for every image (inference: one fixed δ)
        deltas = [float(deltas)] * count_images(input_ids, image_token_id)
    pos, p, k, prev_img = [], -1.0, -1, False
    for img in (input_ids == image_token_id).tolist():
        if img:
            k += not prev_img  # a new image starts
            p += deltas[k]
        else:
            p = (math.ceil(p) if prev_img else p) + 1
        pos.append(p)
        prev_img = img
    if k + 1 != len(deltas):
        raise ValueError(f"v2pe_position_ids: {k + 1} images in the sequence but {len(deltas)} "
                         "deltas")
    return torch.tensor(pos, dtype=torch.float32, device=input_ids.device)


def v2pe_packed_positions(sequences: list[torch.Tensor], T: int, image_token_id: int, rng,
                          delta: float = -1) -> torch.Tensor:
    """Positions of a packed row of T slots holding `sequences` ([T_s] each) -> float [1, T],
    restarting per sequence; each image's δ: `delta` if > 0, else drawn by rng from V2PE_DELTAS."""
    pos, t = torch.zeros(1, T), 0
    for ids in sequences:
        n = count_images(ids, image_token_id)
        deltas = [delta if delta > 0 else rng.choice(V2PE_DELTAS) for _ in range(n)]
        pos[0, t:t + len(ids)] = v2pe_position_ids(ids, image_token_id, deltas)
        t += len(ids)
    return pos


class InternVL(nn.Module):
    def __init__(self, cfg: VLConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = InternViT(cfg.vision)
        self.mlp1 = make_projector(cfg)
        self.language_model = Qwen2(cfg.text)

    def init_weights(self, std: float = 0.02):
        """Random init for training from scratch (released weights overwrite all of this)."""
        for name, p in self.named_parameters():
            if name.endswith(("ls1", "ls2")):
                nn.init.constant_(p, self.cfg.vision.initializer_factor)
            elif p.dim() >= 2 or "embedding" in name:
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # norm weights
                nn.init.ones_(p)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """tiles [N,3,S,S] -> visual tokens [N, num_image_token, C] ready for the LLM."""
        x = self.vision_model(pixel_values, self.cfg.select_layer)[:, 1:]  # [N, P, Cv], CLS dropped
        N, P, Cv = x.shape
        g = int(P ** 0.5)
        x = x.reshape(N, g, g, Cv)  # [N, g, g, Cv]: patch grid, row-major
        x = pixel_unshuffle(x, self.cfg.ps_version)  # [N, g/2, g/2, 4Cv]
        x = x.reshape(N, -1, 4 * Cv)  # [N, P/4, 4Cv]
        return self.mlp1(x)  # [N, P/4, C]

    def embed(self, input_ids, pixel_values=None, image_flags=None, features=None) -> torch.Tensor:
        """Token embeddings [B,T,C] with <IMG_CONTEXT> rows replaced by visual tokens, in order
        (OpenGVLab `InternVLChatModel.forward`). features [N,P/4,C]: visual tokens from
        extract_feature, instead of pixel_values (the PRM scores many rows of one question and runs
        the ViT once). image_flags [N] (training): tiles flagged 0 are dummy tiles (text-only
        samples); their features are dropped, but kept in the graph with weight zero so every ViT
        parameter gets a (zero) gradient and DDP needs no find_unused_parameters."""
        x = self.language_model.model.embed_tokens(input_ids)  # [B, T, C]
        if pixel_values is None and features is None:
            n_ctx = int((input_ids == self.cfg.image_token_id).sum())
            if n_ctx:
                raise UserError(f"the input has {n_ctx} image tokens but no pixel_values were "
                                "given")
            return x
        vit = (self.extract_feature(pixel_values) if features is None
               else features).to(x.dtype)  # [N, P/4, C]
        if image_flags is not None:
            keep = image_flags.bool()
            x = x + 0.0 * vit[~keep].sum()
            vit = vit[keep]
        vit = vit.reshape(-1, vit.size(-1))  # [N*P/4, C]
        is_ctx = input_ids == self.cfg.image_token_id  # [B, T]
        n_ctx = int(is_ctx.sum())
        if n_ctx != vit.size(0):
            raise UserError(f"image tokens and image features do not match: the input has {n_ctx} "
                            f"<IMG_CONTEXT> tokens but the tiles give {vit.size(0)} features "
                            f"({vit.size(0) // max(self.cfg.num_image_token, 1)} tiles x "
                            f"{self.cfg.num_image_token})")
        return x.masked_scatter(is_ctx[..., None], vit)  # row-major over (batch, position)

    def forward(self, input_ids, pixel_values=None, image_flags=None, position_ids=None,
                doc_ids=None, last_only: bool = False):
        """input_ids [B,T], image tokens expanded; pixel_values [N,3,S,S] or None -> logits [B,T,V].
        position_ids [B,T] (float for V2PE; default 0..T-1); doc_ids [B,T] of packed sequences
        (attention stays within a document; -1 = padding); last_only: the last position, [B,1,V]."""
        B, T = input_ids.shape
        x = self.embed(input_ids, pixel_values, image_flags)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.language_model(x, position_ids, causal_mask(B, T, x.device, doc_ids))
        return self.language_model.lm_head(h[:, -1:] if last_only else h)

    def step(self, x, positions, mask: Mask, cache: KVCache, slots):
        """One cached forward of x [B,t,C] into cache `slots` [t] -> last logits [B,V] (fp32)."""
        h = self.language_model(x, positions, mask, cache, slots)
        return self.language_model.lm_head(h[:, -1]).float()

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, dtype=None, device=None) -> "InternVL":
        """A released (or our own) checkpoint directory in either layout (nanovl3/checkpoint.py)."""
        return checkpoint.load_pretrained(cls, ckpt_dir, dtype, device)

    def save_pretrained(self, out_dir: str, layout: str = "original", tokenizer=None):
        """config.json + model.safetensors (+ tokenizer.json) in the original or the -hf layout."""
        checkpoint.save_pretrained(self, out_dir, layout, tokenizer)
