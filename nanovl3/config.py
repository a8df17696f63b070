"""
Model configuration: nested dataclasses, named presets, and the two config.json flavours.

    VLConfig
      .vision  VisionConfig   InternViT (SPEC §1.2)
      .text    TextConfig     Qwen2 decoder (SPEC §1.6)
      + the glue: downsample_ratio, ps_version, select_layer, image_token_id, tiling defaults

Field names are the ones that appear in the released config.json files, so reading and writing them is a
short table rather than a rename zoo. Two layouts exist (SPEC §2.1, §2.3):
  "original"  OpenGVLab/InternVL3-1B      model_type "internvl_chat", keys vision_config / llm_config
  "hf"        OpenGVLab/InternVL3-1B-hf   model_type "internvl",      keys vision_config / text_config
"""

import dataclasses
from dataclasses import dataclass, field

from nanovl3.common import UserError

IMG_CONTEXT_ID = 151667  # <IMG_CONTEXT> in the released Qwen2.5 tokenizer (SPEC §4.4)


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_attention_heads: int = 16
    num_hidden_layers: int = 24
    image_size: int = 448  # one tile is image_size x image_size pixels
    patch_size: int = 14  # one ViT token ("patch") is patch_size x patch_size pixels
    norm_type: str = "layer_norm"  # "layer_norm" (300M) or "rms_norm" (6B)
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True  # false for the 6B ViT
    qk_normalization: bool = False  # true for the 6B ViT: RMSNorm over the full q and k vectors
    hidden_act: str = "gelu"
    drop_path_rate: float = 0.0  # stochastic depth, training only
    initializer_factor: float = 0.1  # layer-scale init (ls1, ls2)


@dataclass
class TextConfig:
    vocab_size: int = 151674
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int = 151643
    eos_token_id: int = 151645

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass
class VLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    downsample_ratio: float = 0.5  # pixel unshuffle: 2x2 patches -> one token
    ps_version: str = "v2"
    select_layer: int = -1
    image_token_id: int = IMG_CONTEXT_ID
    template: str = "internvl2_5"
    # tiling defaults used by sample.py / training (SPEC §3.1)
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: (448/14)^2 * 0.5^2 = 256 for the released models."""
        grid = self.vision.image_size // self.vision.patch_size
        return int(grid * grid * self.downsample_ratio ** 2)


# -----------------------------------------------------------------------------
# presets (SPEC §1.8). The vision tower is InternViT-300M-448px-V2_5 for 1B/2B/8B.

def _vit300m():
    return VisionConfig()


PRESETS = {
    "internvl3-1b": lambda: VLConfig(_vit300m(), TextConfig(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                                             num_attention_heads=14, num_key_value_heads=2)),
    "internvl3-2b": lambda: VLConfig(_vit300m(), TextConfig(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                                             num_attention_heads=12, num_key_value_heads=2)),
    "internvl3-8b": lambda: VLConfig(_vit300m(), TextConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                                             num_attention_heads=28, num_key_value_heads=4)),
    # a model that trains in minutes on a laptop CPU: 112-px tiles of 8x8 patches -> 16 LLM tokens per tile
    "toy": lambda: VLConfig(
        VisionConfig(hidden_size=96, intermediate_size=384, num_attention_heads=4, num_hidden_layers=3, image_size=112),
        TextConfig(vocab_size=1024, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                   num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True),
        max_dynamic_patch=6),
    # the toy recipe sized for one GPU: 224-px tiles (64 LLM tokens each), a wider and deeper ViT and LLM
    "toy-gpu": lambda: VLConfig(
        VisionConfig(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=6, image_size=224),
        TextConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=True),
        max_dynamic_patch=6),
}


def preset(name: str, **text_overrides) -> VLConfig:
    if name not in PRESETS:
        raise UserError(f"--preset: unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    cfg = PRESETS[name]()
    for k, v in text_overrides.items():
        setattr(cfg.text, k, v)
    return cfg


# -----------------------------------------------------------------------------
# reading config.json (both layouts)

SUPPORTED_LLM = "Qwen2ForCausalLM"  # InternVL3-1B/2B/8B/14B/38B/78B; the InternLM3-based 9B is not supported


def detect_layout(d: dict) -> str:
    """SPEC §2.6: tell the two layouts apart from config.json alone."""
    arch = (d.get("architectures") or [""])[0]
    if d.get("model_type") == "internvl_chat" or "llm_config" in d or arch == "InternVLChatModel":
        return "original"
    if d.get("model_type") == "internvl" or "text_config" in d or arch == "InternVLForConditionalGeneration":
        return "hf"
    raise UserError("config.json: not an InternVL config (expected model_type 'internvl_chat' or 'internvl')")


def _pick(d: dict, cls, renames: dict = {}):
    """Build dataclass `cls` from the keys of `d` it knows (after renaming), ignoring the rest (MoE leftovers etc.)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in d.items():
        k = renames.get(k, k)
        if k in names:
            kw[k] = v
    return cls(**kw)


def _text_from_json(t: dict, where: str) -> TextConfig:
    arch = (t.get("architectures") or [SUPPORTED_LLM])[0]
    if t.get("model_type", "qwen2") not in ("qwen2",) or arch != SUPPORTED_LLM:
        raise UserError(f"config.json: {where} is {arch} (model_type '{t.get('model_type')}'); nanovl3 supports only "
                        f"Qwen2-based InternVL3 models ({SUPPORTED_LLM}: InternVL3-1B, 2B, 8B, 14B, 38B, 78B)")
    t = dict(t)
    rp = t.get("rope_parameters") or {}  # transformers v5 spelling
    if "rope_theta" not in t and "rope_theta" in rp:
        t["rope_theta"] = rp["rope_theta"]
    if isinstance(t.get("eos_token_id"), list):
        t["eos_token_id"] = t["eos_token_id"][0]
    return _pick(t, TextConfig)


def config_from_json(d: dict) -> tuple[VLConfig, str]:
    """config.json dict -> (VLConfig, layout)."""
    layout = detect_layout(d)
    if layout == "original":
        v = d.get("vision_config")
        t = d.get("llm_config")
        if not isinstance(v, dict) or not isinstance(t, dict):
            raise UserError("config.json: an original-layout config needs 'vision_config' and 'llm_config' objects")
        vision = _pick(v, VisionConfig)
        text = _text_from_json(t, "llm_config")
        text.tie_word_embeddings = bool(d.get("tie_word_embeddings", text.tie_word_embeddings))
        cfg = VLConfig(vision, text, image_token_id=d.get("img_context_token_id", IMG_CONTEXT_ID))
        for k in ("downsample_ratio", "ps_version", "select_layer", "template", "min_dynamic_patch",
                  "max_dynamic_patch", "use_thumbnail"):
            if d.get(k) is not None:
                setattr(cfg, k, d[k])
    else:
        v = dict(d.get("vision_config") or {})
        t = d.get("text_config")
        if not isinstance(t, dict):
            raise UserError("config.json: an -hf layout config needs a 'text_config' object")
        for k in ("image_size", "patch_size"):  # stored as [h, w]
            if isinstance(v.get(k), (list, tuple)):
                if v[k][0] != v[k][1]:
                    raise UserError(f"config.json: vision_config.{k} = {v[k]}: only square tiles are supported")
                v[k] = v[k][0]
        vision = _pick(v, VisionConfig, {"attention_bias": "qkv_bias", "use_qk_norm": "qk_normalization",
                                         "layer_scale_init_value": "initializer_factor"})
        text = _text_from_json(t, "text_config")
        text.tie_word_embeddings = bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
        cfg = VLConfig(vision, text, downsample_ratio=d.get("downsample_ratio", 0.5),
                       select_layer=d.get("vision_feature_layer", -1), image_token_id=d.get("image_token_id", IMG_CONTEXT_ID))
        if d.get("vision_feature_select_strategy", "default") != "default":
            raise UserError("config.json: only vision_feature_select_strategy 'default' (drop CLS) is supported")
    if cfg.vision.norm_type not in ("layer_norm", "rms_norm"):
        raise UserError(f"config.json: vision norm_type '{cfg.vision.norm_type}' is not supported")
    if cfg.vision.hidden_act != "gelu":
        raise UserError(f"config.json: vision hidden_act '{cfg.vision.hidden_act}' is not supported (only gelu)")
    if cfg.ps_version not in ("v1", "v2"):
        raise UserError(f"config.json: ps_version '{cfg.ps_version}' is not supported (v1 or v2)")
    return cfg, layout


# -----------------------------------------------------------------------------
# writing config.json (both layouts)

def _qwen2_json(t: TextConfig) -> dict:
    return {
        "architectures": [SUPPORTED_LLM], "model_type": "qwen2", "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "use_sliding_window": False,
        "attention_dropout": 0.0, "torch_dtype": "bfloat16",
    }


def config_to_json(cfg: VLConfig, layout: str = "original") -> dict:
    v, t = cfg.vision, cfg.text
    if layout == "original":
        return {
            "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                              **dataclasses.asdict(v), "num_channels": 3, "use_flash_attn": False},
            "llm_config": _qwen2_json(t),
            "downsample_ratio": cfg.downsample_ratio, "ps_version": cfg.ps_version, "select_layer": cfg.select_layer,
            "template": cfg.template, "force_image_size": v.image_size, "dynamic_image_size": True,
            "min_dynamic_patch": cfg.min_dynamic_patch, "max_dynamic_patch": cfg.max_dynamic_patch,
            "use_thumbnail": cfg.use_thumbnail, "pad2square": False, "use_backbone_lora": 0, "use_llm_lora": 0,
            "tie_word_embeddings": t.tie_word_embeddings, "hidden_size": t.hidden_size,
            "img_context_token_id": cfg.image_token_id,  # our addition: toy tokenizers put <IMG_CONTEXT> elsewhere
        }
    if layout == "hf":
        if cfg.ps_version != "v2" or cfg.select_layer != -1:
            raise UserError("save_pretrained(layout='hf'): transformers' InternVL hard-wires ps_version v2")
        return {
            "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
            "vision_config": {
                "model_type": "internvl_vision", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_attention_heads": v.num_attention_heads, "num_hidden_layers": v.num_hidden_layers,
                "image_size": [v.image_size, v.image_size], "patch_size": [v.patch_size, v.patch_size],
                "norm_type": v.norm_type, "layer_norm_eps": v.layer_norm_eps, "attention_bias": v.qkv_bias,
                "use_qk_norm": v.qk_normalization, "hidden_act": v.hidden_act,
                "layer_scale_init_value": v.initializer_factor, "use_mean_pooling": True,
                "use_absolute_position_embeddings": True, "use_mask_token": False, "num_channels": 3,
            },
            "text_config": _qwen2_json(t),
            "image_token_id": cfg.image_token_id, "image_seq_length": cfg.num_image_token,
            "downsample_ratio": cfg.downsample_ratio, "projector_hidden_act": "gelu",
            "vision_feature_layer": cfg.select_layer, "vision_feature_select_strategy": "default",
            "tie_word_embeddings": t.tie_word_embeddings,
        }
    raise UserError(f"layout must be 'original' or 'hf', not '{layout}'")
