"""Checkpoints: the two config.json dialects, the key table between the two weight layouts, loading
and saving released checkpoints, and our own resumable training checkpoints.

    cfg, layout = read_config("InternVL3-1B")                 # "original" or "hf"
    model = InternVL.from_pretrained("InternVL3-1B")          # -> load_pretrained(InternVL, ...)
    model.save_pretrained("out", layout="hf")                 # -> save_pretrained(model, ...)

Two layouts of the same weights:
  "original"  OpenGVLab/InternVL3-1B     model_type "internvl_chat", keys vision_config/llm_config;
              module names of OpenGVLab's modeling_internvl_chat.py (= ours)
  "hf"        OpenGVLab/InternVL3-1B-hf  model_type "internvl", keys vision_config/text_config;
              names of transformers' models/internvl/modeling_internvl.py, ViT qkv split to q/k/v
A training checkpoint is an "original" directory + train_state.pt (optimizer, data cursor, RNGs).
Tests: python -m pytest -q tests/test_model.py tests/test_parity.py tests/test_train.py"""

import dataclasses
import json
import math
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from nanovl3.chat import IMG_CONTEXT, added_tokens
from nanovl3.common import UserError, atomic_path, eprint, pick_device, pick_dtype, read_json
from nanovl3.config import TextConfig, VisionConfig, VLConfig

# model_type -> architecture: InternVL3-1B/2B/8B/14B/38B/78B (Qwen2), the dense InternVL3.5 (Qwen3)
SUPPORTED_LLM = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# -----------------------------------------------------------------------------
# config.json in both layouts: reading, then writing

def detect_layout(d: dict) -> str:
    """The layout of a config.json, from model_type, its sub-config keys or architectures."""
    arch = _arch(d, "architectures")
    if d.get("model_type") == "internvl_chat" or "llm_config" in d or arch == "InternVLChatModel":
        return "original"
    if (d.get("model_type") == "internvl" or "text_config" in d
            or arch == "InternVLForConditionalGeneration"):
        return "hf"
    raise UserError("config.json: not an InternVL config (expected model_type 'internvl_chat' or "
                    "'internvl')")


TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
              str | None: "a string or null"}


def _typed(v, typ, key: str):
    """v as a field of type `typ`, or a UserError naming the key (JSON true is no integer)."""
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
        raise UserError(f"config.json: {key} = {json.dumps(v)[:40]}: expected {TYPE_NAMES[typ]}")
    low = 0 if key.endswith(("_id", "head_dim")) else 1  # ids; head_dim 0 = hidden // heads
    if typ is int and v < low and not key.endswith("layer"):  # select_layer counts from the end
        raise UserError(f"config.json: {key} = {v}: expected an integer >= {low}")
    return v


def _obj(d: dict, key: str, where: str = "", required: bool = True) -> dict:
    """d[key] as a JSON object (absent: {} unless required), or a UserError naming the key."""
    v = d.get(key)
    if isinstance(v, dict) or (v is None and not required):
        return dict(v or {})
    raise UserError(f"config.json: {where}{key} = {json.dumps(v)[:40]}: expected a JSON object")


def _arch(d: dict, where: str) -> str | None:
    a = d.get("architectures")
    if a is not None and not (isinstance(a, list) and all(isinstance(x, str) for x in a)):
        raise UserError(f"config.json: {where} = {json.dumps(a)[:40]}: expected a list of names")
    return a[0] if a else None


def _pick(d: dict, cls, where: str, renames: dict = {}, **given):
    """Dataclass `cls` from the keys of `d` it knows (after renaming), ignoring the rest and nulls
    (released configs have some); each value checked against the field's type."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    return cls(**given, **{renames.get(k, k): _typed(v, types[renames.get(k, k)], where + k)
                           for k, v in d.items()
                           if renames.get(k, k) in types.keys() - given and v is not None})


def _text_from_json(t: dict, where: str) -> TextConfig:
    kind = _typed(t.get("model_type", "qwen2"), str, f"{where}.model_type")
    arch = _arch(t, f"{where}.architectures")
    if kind not in SUPPORTED_LLM or arch not in (None, SUPPORTED_LLM[kind]):
        raise UserError(f"config.json: {where} is {arch} (model_type '{kind}'); nanovl3 supports "
                        "Qwen2 (InternVL3-1B/2B/8B/14B/38B/78B) and dense Qwen3 (InternVL3.5-1B/2B/"
                        "4B/8B/14B/38B) language models, not MoE, GPT-OSS or InternLM ones")
    if kind == "qwen3" and t.get("attention_bias"):
        raise UserError(f"config.json: {where}.attention_bias = true is not supported (Qwen3 "
                        "checkpoints have none)")
    t = dict(t)
    rp = _obj(t, "rope_parameters", where + ".", required=False)  # transformers v5 spelling
    if "rope_theta" not in t and "rope_theta" in rp:
        t["rope_theta"] = rp["rope_theta"]
    if isinstance(t.get("eos_token_id"), list) and t["eos_token_id"]:
        t["eos_token_id"] = t["eos_token_id"][0]
    if kind == "qwen3" and not t.get("head_dim"):
        t["head_dim"] = 128  # transformers' Qwen3Config default, not hidden_size // heads
    return _pick(t, TextConfig, where + ".")


def _original_config(d: dict) -> VLConfig:
    return _pick(d, VLConfig, "", {"img_context_token_id": "image_token_id"},
                 vision=_pick(_obj(d, "vision_config"), VisionConfig, "vision_config."),
                 text=_text_from_json(_obj(d, "llm_config"), "llm_config"))


# the -hf vision_config's names of VisionConfig's fields (the rest are stored differently or fixed)
HF_VISION = {**{k: k for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                               "num_hidden_layers", "norm_type", "layer_norm_eps", "hidden_act")},
             "attention_bias": "qkv_bias", "use_qk_norm": "qk_normalization",
             "layer_scale_init_value": "initializer_factor"}


def _hf_config(d: dict) -> VLConfig:
    v = _obj(d, "vision_config", required=False)
    for k in ("image_size", "patch_size"):  # stored as [h, w]
        if isinstance(v.get(k), list):
            if len(v[k]) != 2 or v[k][0] != v[k][1]:
                raise UserError(f"config.json: vision_config.{k} = {v[k]}: only square tiles "
                                "([size, size]) are supported")
            v[k] = v[k][0]
    if d.get("vision_feature_select_strategy", "default") != "default":
        raise UserError("config.json: only vision_feature_select_strategy 'default' (drop CLS) is "
                        "supported")
    glue = {k: d.get(k) for k in ("downsample_ratio", "image_token_id", "vision_feature_layer")}
    return _pick(glue, VLConfig, "", {"vision_feature_layer": "select_layer"},
                 vision=_pick(v, VisionConfig, "vision_config.", HF_VISION),
                 text=_text_from_json(_obj(d, "text_config"), "text_config"))


def config_from_json(d: dict) -> tuple[VLConfig, str]:
    if not isinstance(d, dict):
        raise UserError(f"config.json: expected a JSON object, got {json.dumps(d)[:40]}")
    layout = detect_layout(d)
    cfg = _original_config(d) if layout == "original" else _hf_config(d)
    if d.get("tie_word_embeddings") is not None:  # -hf: else text_config's, or False
        cfg.text.tie_word_embeddings = _typed(d["tie_word_embeddings"], bool, "tie_word_embeddings")
    # template: the one prompt format chat.py renders (InternVL2.5, InternVL3, Qwen3 InternVL3.5)
    for key, value, allowed in (("vision norm_type", cfg.vision.norm_type, "layer_norm rms_norm"),
                                ("vision hidden_act", cfg.vision.hidden_act, "gelu"),
                                ("template", cfg.template, "internvl2_5"),
                                ("ps_version", cfg.ps_version, "v1 v2")):
        if value not in allowed.split():
            raise UserError(f"config.json: {key} '{value}' is not supported (only "
                            f"{' or '.join(allowed.split())})")
    return cfg, layout


def read_config(ckpt_dir: str) -> tuple[VLConfig, str]:
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"{ckpt_dir}: checkpoint directory does not exist")
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{ckpt_dir}: no config.json (is this a checkpoint directory?)")
    d = read_json(path)
    try:
        return config_from_json(d)
    except UserError as e:
        raise UserError(f"{path}: {str(e).removeprefix('config.json: ')}")


def _llm_json(t: TextConfig) -> dict:
    qwen3 = {"attention_bias": False} if t.model_type == "qwen3" else {}  # Qwen2 has no such key
    return {"architectures": [SUPPORTED_LLM[t.model_type]], **dataclasses.asdict(t), **qwen3,
            "hidden_act": "silu", "use_sliding_window": False, "attention_dropout": 0.0,
            "torch_dtype": "bfloat16"}


def config_to_json(cfg: VLConfig, layout: str = "original") -> dict:
    v, t = cfg.vision, cfg.text
    if layout == "original":
        return {
            "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                              **dataclasses.asdict(v), "num_channels": 3, "use_flash_attn": False},
            "llm_config": _llm_json(t),
            "downsample_ratio": cfg.downsample_ratio, "ps_version": cfg.ps_version,
            "select_layer": cfg.select_layer, "template": cfg.template,
            "system_message": cfg.system_message,
            "force_image_size": v.image_size, "dynamic_image_size": True,
            "min_dynamic_patch": cfg.min_dynamic_patch, "max_dynamic_patch": cfg.max_dynamic_patch,
            "use_thumbnail": cfg.use_thumbnail, "split_tiles": cfg.split_tiles,
            "pad2square": False, "use_backbone_lora": 0,
            "use_llm_lora": 0, "tie_word_embeddings": t.tie_word_embeddings,
            "hidden_size": t.hidden_size,
            "img_context_token_id": cfg.image_token_id}  # ours: toy tokenizers move <IMG_CONTEXT>
    if layout == "hf":
        if cfg.ps_version != "v2" or cfg.select_layer != -1:
            raise UserError("save_pretrained(layout='hf'): transformers' InternVL hard-wires "
                            "ps_version v2")
        return {
            "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
            "vision_config": {
                "model_type": "internvl_vision", **{k: getattr(v, f) for k, f in HF_VISION.items()},
                "image_size": [v.image_size] * 2, "patch_size": [v.patch_size] * 2,
                "use_mean_pooling": True, "use_absolute_position_embeddings": True,
                "use_mask_token": False, "num_channels": 3},
            "text_config": _llm_json(t),
            "image_token_id": cfg.image_token_id, "image_seq_length": cfg.num_image_token,
            "downsample_ratio": cfg.downsample_ratio, "projector_hidden_act": "gelu",
            "vision_feature_layer": cfg.select_layer, "vision_feature_select_strategy": "default",
            "tie_word_embeddings": t.tie_word_embeddings}
    raise UserError(f"layout must be 'original' or 'hf', not '{layout}'")


# -----------------------------------------------------------------------------
# the key table: original name piece <-> -hf name piece, read both ways; the ViT's fused qkv (split
# into q/k/v_proj in -hf) is the one transform that is not a rename
KEY_TABLE = [("vision_model.", "vision_tower."),
             (".embeddings.class_embedding", ".embeddings.cls_token"),
             (".embeddings.position_embedding", ".embeddings.position_embeddings"),
             (".embeddings.patch_embedding.", ".embeddings.patch_embeddings.projection."),
             (".encoder.layers.", ".encoder.layer."),
             (".attn.proj.", ".attention.projection_layer."),
             (".attn.q_norm.", ".attention.q_norm."), (".attn.k_norm.", ".attention.k_norm."),
             (".norm1.", ".layernorm_before."), (".norm2.", ".layernorm_after."),
             (".ls1", ".lambda_1"), (".ls2", ".lambda_2"),
             ("mlp1.0.", "multi_modal_projector.layer_norm."),
             ("mlp1.1.", "multi_modal_projector.linear_1."),
             ("mlp1.3.", "multi_modal_projector.linear_2.")]
# transformers' in-memory module names (the live model's state_dict(), some exports)
HF_IN_MEMORY = [("model.vision_tower.", "vision_tower."),
                ("model.multi_modal_projector.", "multi_modal_projector."),
                ("model.language_model.", "language_model.model."),
                ("lm_head.", "language_model.lm_head.")]


def _rename(key: str, pairs, reverse: bool = False) -> str:
    """Apply each (a -> b) pair once: a piece starting with '.' anywhere, others as a prefix."""
    for a, b in pairs:
        a, b = (b, a) if reverse else (a, b)
        if a.startswith("."):
            key = key.replace(a, b, 1)
        elif key.startswith(a):
            key = b + key[len(a):]
    return key


def original_key(key: str) -> tuple[str, int | None]:
    """Either layout's key -> (our name, None), or for a -hf ViT q/k/v piece (fused name, 0/1/2)."""
    key = _rename(key, HF_IN_MEMORY)
    if not key.startswith(("vision_tower.", "multi_modal_projector.")):
        return key, None
    key = _rename(key, KEY_TABLE, reverse=True)
    for i, part in enumerate("qkv"):
        piece = f".attention.{part}_proj."
        if piece in key:  # layers.3.attention.q_proj.weight -> rows of layers.3.attn.qkv.weight
            return key.replace(piece, ".attn.qkv."), i
    return key, None


def _check_qkv(name: str, parts: dict):
    if set(parts) != {0, 1, 2}:
        raise UserError(f"checkpoint: {name}: found only the {sorted('qkv'[i] for i in parts)} "
                        "parts of q/k/v")


def to_original_names(state: dict) -> dict:
    """A state dict of either layout -> our names, the -hf ViT q/k/v fused as rows [q; k; v]."""
    out, qkv = {}, {}
    for k, v in state.items():
        name, part = original_key(k)
        if part is None:
            out[name] = v
        else:
            qkv.setdefault(name, {})[part] = v
    for k, parts in qkv.items():
        _check_qkv(k, parts)
        out[k] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out


def to_hf_names(state: dict) -> dict:
    """Our (original-layout) state dict -> transformers' -hf on-disk names, the ViT qkv split."""
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
# loading released weights
# Not safe_open: its memory map peaks at 2.0x the weights (measured); ours at the weights + 1 tensor

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _weight_files(ckpt_dir: str) -> list[tuple[str, list[str] | None]]:
    """[(file, keys to read or None for all)] from model.safetensors or a sharded index."""
    single = os.path.join(ckpt_dir, "model.safetensors")
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            weight_map = read_json(index)["weight_map"]
        except (KeyError, TypeError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({e})")
        shards = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        return [(os.path.join(ckpt_dir, s), keys) for s, keys in sorted(shards.items())]
    if os.path.isfile(single):
        return [(single, None)]
    if any(f.endswith(".bin") for f in os.listdir(ckpt_dir)):
        raise UserError(f"{ckpt_dir}: only .bin weights found; nanovl3 reads safetensors "
                        "(model.safetensors)")
    raise UserError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json")


def _read_header(path: str) -> dict[str, tuple[torch.dtype, list[int], int]]:
    """A .safetensors file's index -> {key: (dtype, shape, byte offset)}. Format: a little-endian
    8-byte header length n, n bytes of JSON {key: {dtype, shape, data_offsets}}, then the data."""
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
            if e["dtype"] not in SAFETENSORS_DTYPES:  # e.g. F8_E4M3 of a quantised export
                raise UserError(f"{path}: tensor {key} has dtype {e['dtype']}, which nanovl3 does "
                                "not read (F32, F16 or BF16 weights)")
            dtype, shape, (begin, end) = (SAFETENSORS_DTYPES[e["dtype"]], list(e["shape"]),
                                          e["data_offsets"])
            if (not 0 <= begin <= end <= size - 8 - n
                    or end - begin != math.prod(shape) * dtype.itemsize):
                raise ValueError(f"{key}: data offsets {[begin, end]} do not fit the file")
            out[key] = (dtype, shape, 8 + n + begin)
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON, UTF-8 errors: ValueError
        raise UserError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})")


def _load_plan(ckpt_dir: str, params: dict, tied: bool) -> list[tuple[str, list]]:
    """[(file, [(offset, file dtype, destination)])] of every parameter, checked before any read."""
    found = {}  # our name -> {part (None, or 0/1/2 of a -hf q/k/v): (file, offset, dtype, shape)}
    for path, keys in _weight_files(ckpt_dir):
        header = _read_header(path)
        for k in keys if keys is not None else header:
            if k not in header:
                raise UserError(f"{path}: corrupt or truncated safetensors file (no tensor {k}, "
                                "which the index names)")
            name, part = original_key(k)
            if not (tied and name == "language_model.lm_head.weight"):  # tied head = embed_tokens
                dtype, shape, offset = header[k]
                if not dtype.is_floating_point:  # copying ints into weights would pass silently
                    raise UserError(f"{path}: tensor {k} has dtype {dtype}; weights must be "
                                    "floating point (F32, F16 or BF16)")
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
            dst = params[name] if part is None else params[name][row:row + shape[0]]  # contiguous
            row += shape[0]
            plan.setdefault(path, []).append((offset, dtype, dst))
    return [(path, sorted(items, key=lambda it: it[0])) for path, items in plan.items()]


def _read_into(path: str, items: list):
    """Read each (offset, file dtype, dst) in file order; via a buffer if dtype/device differ."""
    with open(path, "rb", buffering=0) as f:
        for offset, dtype, dst in items:
            same = dst.dtype == dtype and dst.device.type == "cpu"
            buf = dst if same else torch.empty(dst.shape, dtype=dtype)
            view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())  # its bytes, writable
            f.seek(offset)
            done = 0
            while done < len(view):  # one read returns at most ~2 GB
                n = f.readinto(view[done:])
                if not n:
                    raise UserError(f"{path}: corrupt or truncated safetensors file (ends inside "
                                    "a tensor)")
                done += n
            if buf is not dst:
                dst.copy_(buf)


def _check_keys(state: dict, expected: dict, ckpt_dir: str):
    """state, expected: {name: shape}."""
    msg = [f"{ckpt_dir}: checkpoint does not match its config.json:"]
    for what, keys in (("missing", set(expected) - set(state)),
                       ("unexpected", set(state) - set(expected))):
        if keys:
            keys = sorted(keys)
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            msg.append(f"{len(keys)} {what} keys: {', '.join(keys[:5])}{more}")
    if len(msg) > 1:
        raise UserError(" ".join(msg))
    for k, shape in expected.items():
        if list(state[k]) != list(shape):
            raise UserError(f"{ckpt_dir}: {k} has shape {list(state[k])}, the config implies "
                            f"{list(shape)}")


def _tokenizer_image_token_id(ckpt_dir: str) -> int | None:
    """The <IMG_CONTEXT> id of the directory's tokenizer files, if any. It differs between releases
    (151667 after Qwen2.5's tokens; Qwen3's tokenizer has more) and toy tokenizers move it, while
    original-layout configs need not name it (upstream asks the tokenizer at chat time)."""
    try:
        return next((i for i, t in added_tokens(ckpt_dir).items() if t["content"] == IMG_CONTEXT),
                    None)
    except UserError:
        return None  # the tokenizer loader reports a broken file with its own message


def load_pretrained(cls, ckpt_dir: str, dtype=None, device=None):
    """A released (or our own) checkpoint directory in either layout -> cls(cfg) with its weights;
    dtype/device None: bf16 on CUDA, fp32 on CPU. Built on the meta device, then given uninitialised
    memory in `dtype` (one copy of the weights) that each tensor is read straight into."""
    device = pick_device(device) if not isinstance(device, torch.device) else device
    dtype = pick_dtype(dtype, device) if not isinstance(dtype, torch.dtype) else dtype
    cfg, _ = read_config(ckpt_dir)
    if (tok_id := _tokenizer_image_token_id(ckpt_dir)) is not None:
        cfg.image_token_id = tok_id
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype).to_empty(device=device)  # allocated, untouched: no memory until read
    if tied := cfg.text.tie_word_embeddings:  # to_empty untied the shared Parameter: tie again
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    params = {k: p.detach() for k, p in model.named_parameters()}  # a tied head is listed once
    with torch.no_grad():
        for path, items in _load_plan(ckpt_dir, params, tied):
            _read_into(path, items)
    model.source_dir = os.path.abspath(ckpt_dir)  # save_pretrained copies its tokenizer files
    return model.eval()


# what sample.py / Tokenizer.from_dir read besides the weights and config.json
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "special_tokens_map.json", "generation_config.json"]


def save_pretrained(model, out_dir: str, layout: str = "original", tokenizer=None):
    """config.json + model.safetensors + the tokenizer, atomically; either reader loads it. With no
    tokenizer given, the tokenizer files of the directory the model was loaded from are copied."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.text.tie_word_embeddings:
        state.pop("language_model.lm_head.weight")  # tied: safetensors rejects aliases
    config = config_to_json(model.cfg, layout)
    state = to_hf_names(state) if layout == "hf" else state
    with atomic_path(out_dir) as tmp:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        source = getattr(model, "source_dir", None)
        if tokenizer is not None:
            tokenizer.save(tmp)
        elif source is not None:
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(source, name)):
                    shutil.copyfile(os.path.join(source, name), os.path.join(tmp, name))
        else:
            eprint(f"warning: save_pretrained({out_dir}): no tokenizer given; sample.py will need "
                   "a tokenizer.json in that directory")


# -----------------------------------------------------------------------------
# our training checkpoints: a directory sample.py loads + the state that resumes the run exactly

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, model, tokenizer, train_state: dict):
    """`path/` atomically (the old one intact until done): save_pretrained's + train_state.pt."""
    with atomic_path(path) as tmp:
        save_pretrained(model, tmp, layout="original", tokenizer=tokenizer)
        torch.save(train_state, os.path.join(tmp, "train_state.pt"))


def save_run(path: str, model, tokenizer, stream, train_state: dict, rank: int, world: int):
    """save_checkpoint from rank 0 with every rank's data cursor and RNG state (each rank draws its
    own data). Every rank must call it (it gathers)."""
    data, rngs = [stream.state_dict()], [rng_state()]
    if world > 1:
        data, rngs = [None] * world, [None] * world
        dist.all_gather_object(data, stream.state_dict())
        dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        state = {**train_state, "data": data, "rng": rngs, "world_size": world}
        save_checkpoint(path, model, tokenizer, state)
    if world > 1:
        dist.barrier()


def restore_run(state: dict, stream, rank: int, world: int):
    """The other half of save_run: this rank's data cursor and RNG state (the optimizer state:
    training.Session.restore)."""
    if state["world_size"] != world:
        raise UserError(f"--resume: the checkpoint was written by {state['world_size']} processes, "
                        f"this run has {world}; resume with the same number")
    stream.load_state_dict(state["data"][rank])
    set_rng_state(state["rng"][rank])


def load_train_state(path: str) -> dict:
    f = os.path.join(path, "train_state.pt")
    if not os.path.isfile(f):
        raise UserError(f"--resume: {path} has no train_state.pt (not a training checkpoint)")
    return torch.load(f, map_location="cpu", weights_only=False)
