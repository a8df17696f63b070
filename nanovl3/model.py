"""
InternVL3 = InternViT -> pixel unshuffle -> MLP projector -> Qwen2, "ViT-MLP-LLM" (arXiv 2504.10479 §2.1).

    tiles [N,3,S,S] --InternViT--> [N,1+P,Cv] --drop CLS, unshuffle 2x2--> [N,P/4,4Cv] --mlp1--> [N,P/4,C]
    text ids [B,T] --embed--> [B,T,C]; rows where id == <IMG_CONTEXT> are replaced, in order, by the visual rows
    --Qwen2--> logits [B,T,V]

Also here: V2PE position ids (the one place the paper's variable visual position encoding lives), and reading /
writing released checkpoints in both layouts (original OpenGVLab and transformers "-hf"), SPEC §2.
Upstream: OpenGVLab/InternVL modeling_internvl_chat.py; transformers models/internvl/modeling_internvl.py.
"""

import json
import math
import os

import torch
import torch.nn as nn
from safetensors.torch import save_file

from nanovl3.attention import Mask, causal_mask
from nanovl3.common import UserError, atomic_path, pick_device, pick_dtype
from nanovl3.config import VLConfig, config_from_json, config_to_json
from nanovl3.text import KVCache, Linear, Qwen2
from nanovl3.vision import InternViT

# -----------------------------------------------------------------------------
# the glue: pixel unshuffle and the projector


def pixel_unshuffle(x: torch.Tensor, ps_version: str = "v2") -> torch.Tensor:
    """Merge each 2x2 block of patch tokens into one token with 4x the channels (InternVL's `pixel_shuffle`, 0.5).

    x [N, h, w, C] (h = patch row, w = patch column) -> [N, h/2, w/2, 4C]. With ps_version v2 the output token
    (i, j) holds concat(x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]): top-left, top-right, bottom-left,
    bottom-right (SPEC §1.4). v1 leaves the grid transposed.
    """
    N, h, w, C = x.shape
    x = x.reshape(N, h, w // 2, 2 * C)  # [N, h, w/2, 2C]: horizontal pairs merged
    x = x.permute(0, 2, 1, 3)  # [N, w/2, h, 2C]
    x = x.reshape(N, w // 2, h // 2, 4 * C)  # [N, w/2, h/2, 4C]: vertical pairs merged
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3)  # [N, h/2, w/2, 4C]: back to row-major
    return x.contiguous()


def make_projector(cfg: VLConfig) -> nn.Sequential:
    """`mlp1`: LayerNorm(4Cv) -> Linear(4Cv, C) -> GELU -> Linear(C, C). Index 2 (GELU) has no weights."""
    c_in = cfg.vision.hidden_size * int(1 / cfg.downsample_ratio) ** 2
    c = cfg.text.hidden_size
    return nn.Sequential(nn.LayerNorm(c_in, eps=1e-5), Linear(c_in, c), nn.GELU(), Linear(c, c))


# -----------------------------------------------------------------------------
# V2PE (InternVL3 §2.1, V2PE arXiv 2412.09616)


def count_images(input_ids: torch.Tensor, image_token_id: int) -> int:
    """Images in a sequence [T]: runs of consecutive <IMG_CONTEXT> tokens."""
    is_img = input_ids == image_token_id
    return int(is_img[0]) + int((is_img[1:] & ~is_img[:-1]).sum()) if len(is_img) else 0


def v2pe_position_ids(input_ids: torch.Tensor, image_token_id: int, deltas: list[float] | float) -> torch.Tensor:
    """Positions of one sequence, input_ids [T] -> float [T]; one δ per image, or one float for all of them.

    "p_i = p_{i-1} + 1 if x_i is a text token, p_{i-1} + δ if x_i is a visual token", δ constant within an image
    (image k of the sequence uses deltas[k]). As in the reference (OpenGVLab/V2PE get_rope_pos_id) the first text
    token after an image resumes at ceil(last visual position) + 1. With every δ = 1 this is 0, 1, ..., T-1.
    """
    is_img = (input_ids == image_token_id).tolist()
    if isinstance(deltas, (int, float)):  # the same δ for every image (inference uses one fixed δ)
        deltas = [float(deltas)] * count_images(input_ids, image_token_id)
    pos, p, k, prev_img = [], -1.0, -1, False
    for img in is_img:
        if img and not prev_img:
            k += 1  # a new image starts
        if img:
            p += deltas[k]
        else:
            p = (math.ceil(p) if prev_img else p) + 1
        pos.append(p)
        prev_img = img
    if k + 1 != len(deltas):
        raise ValueError(f"v2pe_position_ids: {k + 1} images in the sequence but {len(deltas)} deltas")
    return torch.tensor(pos, dtype=torch.float32, device=input_ids.device)


# -----------------------------------------------------------------------------
# the model


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

    # ---- vision features

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
        """Token embeddings [B,T,C] with <IMG_CONTEXT> rows replaced by visual tokens, in order (SPEC §1.7).

        features [N,P/4,C]: visual tokens already computed by extract_feature, instead of pixel_values (the PRM
        scores many rows of one question and runs the ViT once).

        image_flags [N] (training): tiles flagged 0 are padding/dummy tiles (text-only samples); their features are
        dropped, but kept in the graph with weight zero so every ViT parameter gets a (zero) gradient and DDP
        needs no find_unused_parameters.
        """
        x = self.language_model.model.embed_tokens(input_ids)  # [B, T, C]
        if pixel_values is None and features is None:
            n_ctx = int((input_ids == self.cfg.image_token_id).sum())
            if n_ctx:
                raise UserError(f"the input has {n_ctx} image tokens but no pixel_values were given")
            return x
        vit = (self.extract_feature(pixel_values) if features is None else features).to(x.dtype)  # [N, P/4, C]
        if image_flags is not None:
            keep = image_flags.bool()
            x = x + 0.0 * vit[~keep].sum()
            vit = vit[keep]
        vit = vit.reshape(-1, vit.size(-1))  # [N*P/4, C]
        is_ctx = input_ids == self.cfg.image_token_id  # [B, T]
        n_ctx = int(is_ctx.sum())
        if n_ctx != vit.size(0):
            raise UserError(f"image tokens and image features do not match: the input has {n_ctx} <IMG_CONTEXT> "
                            f"tokens but the tiles give {vit.size(0)} features "
                            f"({vit.size(0) // max(self.cfg.num_image_token, 1)} tiles x {self.cfg.num_image_token})")
        return x.masked_scatter(is_ctx[..., None], vit)  # row-major over (batch, position)

    # ---- forward

    def forward(self, input_ids, pixel_values=None, image_flags=None, position_ids=None, doc_ids=None,
                last_only: bool = False):
        """input_ids [B,T] with image tokens already expanded; pixel_values [N,3,S,S] or None -> logits [B,T,V].

        position_ids [B,T] (float for V2PE; default 0..T-1), doc_ids [B,T] for packed sequences (tokens attend only
        within their own document; -1 = padding). last_only: logits of the last position only ([B,1,V]).
        """
        B, T = input_ids.shape
        x = self.embed(input_ids, pixel_values, image_flags)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.language_model(x, position_ids, causal_mask(B, T, x.device, doc_ids))
        if last_only:
            h = h[:, -1:]
        return self.language_model.lm_head(h)

    def step(self, x, positions, mask: Mask, cache: KVCache, slots):
        """One cached forward of embeddings x [B,t,C] into `slots` [t] of the cache -> last logits [B,V] (fp32)."""
        h = self.language_model(x, positions, mask, cache, slots)
        return self.language_model.lm_head(h[:, -1]).float()

    # ---- checkpoints

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, dtype=None, device=None) -> "InternVL":
        """Load a released (or our own) checkpoint directory in either layout.

        dtype/device None: bf16 on CUDA, fp32 on CPU. The model is built on the meta device and given uninitialised
        memory in the requested dtype (one copy of the weights); every tensor of the files is then read straight
        into its parameter, converted per tensor when the file holds another dtype. Peak memory: the weights plus
        the largest tensor (plain reads, not a memory map, so the file's pages never count as the process's).
        Keys and shapes are all checked before any data is read.
        """
        device = pick_device(device) if not isinstance(device, torch.device) else device
        dtype = pick_dtype(dtype, device) if not isinstance(dtype, torch.dtype) else dtype
        cfg, layout = read_config(ckpt_dir)
        tok_id = _tokenizer_image_token_id(ckpt_dir)
        if tok_id is not None:
            cfg.image_token_id = tok_id
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to(dtype).to_empty(device=device)  # allocated, not touched: costs no memory until read into
        if cfg.text.tie_word_embeddings:  # to_empty gave the shared Parameter two storages: tie again
            model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
        params = {k: p.detach() for k, p in model.named_parameters()}  # a tied head is listed once, as embed_tokens
        with torch.no_grad():
            for path, items in _load_plan(ckpt_dir, params, cfg.text.tie_word_embeddings):
                _read_into(path, items)
        return model.eval()

    def save_pretrained(self, out_dir: str, layout: str = "original", tokenizer=None):
        """Write config.json + model.safetensors (+ tokenizer.json) atomically; loads back in either reader."""
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.cfg.text.tie_word_embeddings:
            state.pop("language_model.lm_head.weight")  # shared with embed_tokens; safetensors rejects aliases
        config = config_to_json(self.cfg, layout)
        if layout == "hf":
            state = to_hf_names(state)
        with atomic_path(out_dir) as tmp:
            os.makedirs(tmp)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)
            save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save(tmp)


# -----------------------------------------------------------------------------
# checkpoint layouts: one key table (SPEC §2.5), read both ways

# original name piece <-> -hf on-disk name piece. The fused ViT qkv is the one real transform (split in -hf).
KEY_TABLE = [
    ("vision_model.", "vision_tower."),
    (".embeddings.class_embedding", ".embeddings.cls_token"),
    (".embeddings.position_embedding", ".embeddings.position_embeddings"),
    (".embeddings.patch_embedding.", ".embeddings.patch_embeddings.projection."),
    (".encoder.layers.", ".encoder.layer."),
    (".attn.proj.", ".attention.projection_layer."),
    (".attn.q_norm.", ".attention.q_norm."),
    (".attn.k_norm.", ".attention.k_norm."),
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
    (".ls1", ".lambda_1"),
    (".ls2", ".lambda_2"),
    ("mlp1.0.", "multi_modal_projector.layer_norm."),
    ("mlp1.1.", "multi_modal_projector.linear_1."),
    ("mlp1.3.", "multi_modal_projector.linear_2."),
]
# transformers' in-memory module names (what a state_dict() of the live model, or some exports, contain)
HF_IN_MEMORY = [("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")]


def _rename(key: str, pairs, reverse: bool = False) -> str:
    """Apply each (a -> b) pair once: pieces starting with '.' anywhere in the key, others only as a prefix."""
    for a, b in pairs:
        if reverse:
            a, b = b, a
        if a.startswith("."):
            key = key.replace(a, b, 1)
        elif key.startswith(a):
            key = b + key[len(a):]
    return key


def original_key(key: str) -> tuple[str, int | None]:
    """A key of either layout -> (our name, None), or for a -hf ViT q/k/v piece (the fused qkv name, 0/1/2)."""
    for a, b in HF_IN_MEMORY:
        if key.startswith(a):
            key = b + key[len(a):]
            break
    if not key.startswith(("vision_tower.", "multi_modal_projector.")):
        return key, None
    key = _rename(key, KEY_TABLE, reverse=True)
    for i, part in enumerate("qkv"):
        piece = f".attention.{part}_proj."
        if piece in key:  # vision_model.encoder.layers.3.attention.q_proj.weight -> rows i of ...attn.qkv.weight
            return key.replace(piece, ".attn.qkv."), i
    return key, None


def to_original_names(state: dict, cfg: VLConfig) -> dict:
    """Rename a state dict of either layout to ours (= the original layout); fuse the -hf q/k/v of the ViT."""
    out, qkv = {}, {}
    for k, v in state.items():
        name, part = original_key(k)
        if part is None:
            out[name] = v
        else:
            qkv.setdefault(name, {})[part] = v
    for k, parts in qkv.items():
        _check_qkv(k, parts)
        out[k] = torch.cat([parts[0], parts[1], parts[2]], dim=0)  # rows [q; k; v]
    return out


def _check_qkv(name: str, parts: dict):
    if set(parts) != {0, 1, 2}:
        raise UserError(f"checkpoint: {name}: found only the {sorted('qkv'[i] for i in parts)} parts of q/k/v")


def to_hf_names(state: dict) -> dict:
    """Our (original-layout) state dict -> transformers' -hf on-disk names, splitting the ViT qkv."""
    out = {}
    for k, v in state.items():
        if k.startswith(("vision_model.", "mlp1.")):
            k = _rename(k, KEY_TABLE)
            if ".attn.qkv." in k:
                for part, chunk in zip("qkv", v.chunk(3, dim=0)):
                    out[k.replace(".attn.qkv.", f".attention.{part}_proj.")] = chunk.contiguous()
                continue
        out[k] = v
    return out


# -----------------------------------------------------------------------------
# checkpoint files


def read_config(ckpt_dir: str) -> tuple[VLConfig, str]:
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"{ckpt_dir}: checkpoint directory does not exist")
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{ckpt_dir}: no config.json (is this a checkpoint directory?)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})")
    try:
        return config_from_json(d)
    except UserError as e:
        raise UserError(f"{path}: {e}".replace("config.json: ", ""))


def _weight_files(ckpt_dir: str) -> list[tuple[str, list[str] | None]]:
    """[(file, keys to read or None for all)] from model.safetensors or a sharded index."""
    single = os.path.join(ckpt_dir, "model.safetensors")
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({e})")
        shards = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        return [(os.path.join(ckpt_dir, s), keys) for s, keys in sorted(shards.items())]
    if os.path.isfile(single):
        return [(single, None)]
    if any(f.endswith(".bin") for f in os.listdir(ckpt_dir)):
        raise UserError(f"{ckpt_dir}: only .bin weights found; nanovl3 reads safetensors (model.safetensors)")
    raise UserError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def _read_header(path: str) -> dict[str, tuple[torch.dtype, list[int], int]]:
    """The index of a .safetensors file -> {key: (dtype, shape, byte offset in the file)}.

    The format: 8 bytes little-endian header length n, n bytes of JSON {key: {dtype, shape, data_offsets}}, data.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing weight file (named in the index)")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out = {}
        for key, e in header.items():
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[e["dtype"]], list(e["shape"]), e["data_offsets"]
            if not 0 <= begin <= end <= size - 8 - n or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{key}: data offsets {[begin, end]} do not fit the file")
            out[key] = (dtype, shape, 8 + n + begin)
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise UserError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})")


def _load_plan(ckpt_dir: str, params: dict, tied: bool) -> list[tuple[str, list]]:
    """[(file, [(offset, file dtype, destination tensor)])]: where each parameter's bytes are, all checked first."""
    found = {}  # our name -> {part (None, or 0/1/2 of a -hf q/k/v): (file, offset, dtype, shape)}
    for path, keys in _weight_files(ckpt_dir):
        header = _read_header(path)
        for k in keys if keys is not None else header:
            if k not in header:
                raise UserError(f"{path}: corrupt or truncated safetensors file (no tensor {k}, which the index names)")
            name, part = original_key(k)
            if not (tied and name == "language_model.lm_head.weight"):  # a tied head is embed_tokens
                dtype, shape, offset = header[k]
                found.setdefault(name, {})[part] = (path, offset, dtype, shape)
    shapes = {}
    for name, parts in found.items():
        if None not in parts:  # the fused ViT qkv: rows [q; k; v]
            _check_qkv(name, parts)
            shapes[name] = [sum(parts[i][3][0] for i in range(3))] + parts[0][3][1:]
        else:
            shapes[name] = parts[None][3]
    _check_keys(shapes, {k: list(p.shape) for k, p in params.items()}, ckpt_dir)
    plan = {}
    for name, parts in found.items():
        row = 0
        for part in [None] if None in parts else [0, 1, 2]:
            path, offset, dtype, shape = parts[part]
            dst = params[name] if part is None else params[name][row:row + shape[0]]  # contiguous rows
            row += shape[0]
            plan.setdefault(path, []).append((offset, dtype, dst))
    return [(path, sorted(items, key=lambda it: it[0])) for path, items in plan.items()]


def _read_into(path: str, items: list):
    """Read each (offset, file dtype, destination) of one file, in file order: straight into the parameter when
    the dtypes match on CPU, else into a buffer of that one tensor, converted by copy_."""
    with open(path, "rb", buffering=0) as f:
        for offset, dtype, dst in items:
            buf = dst if dst.dtype == dtype and dst.device.type == "cpu" else torch.empty(dst.shape, dtype=dtype)
            view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, writable
            f.seek(offset)
            done = 0
            while done < len(view):  # one read returns at most ~2 GB
                n = f.readinto(view[done:])
                if not n:
                    raise UserError(f"{path}: corrupt or truncated safetensors file (ends inside a tensor)")
                done += n
            if buf is not dst:
                dst.copy_(buf)


def _check_keys(state: dict, expected: dict, ckpt_dir: str):
    """state, expected: {name: shape}."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        msg = [f"{ckpt_dir}: checkpoint does not match its config.json:"]
        if missing:
            msg.append(f"{len(missing)} missing keys: {few(missing)}")
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected keys: {few(unexpected)}")
        raise UserError(" ".join(msg))
    for k, shape in expected.items():
        if list(state[k]) != list(shape):
            raise UserError(f"{ckpt_dir}: {k} has shape {list(state[k])}, the config implies {list(shape)}")


def _tokenizer_image_token_id(ckpt_dir: str) -> int | None:
    """The <IMG_CONTEXT> id of the directory's tokenizer.json, if it has one (toy tokenizers place it elsewhere)."""
    path = os.path.join(ckpt_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            added = json.load(f).get("added_tokens", [])
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None  # the tokenizer loader reports a broken file with its own message
    return next((t["id"] for t in added if t.get("content") == "<IMG_CONTEXT>"), None)
