"""Model configuration: nested dataclasses and named presets. No behaviour.

    VLConfig
      .vision  VisionConfig   InternViT (InternVL2.5 model architecture, arXiv 2412.05271)
      .text    TextConfig     Qwen2 decoder (InternVL3) or Qwen3 (the dense InternVL3.5 models)
      + the glue: downsample_ratio, ps_version, select_layer, image_token_id, tiling defaults

Field names are those of the released config.json files, so checkpoint.py reads and writes them
with a short table. The released InternVL3-1B/2B/8B all use InternViT-300M-448px-V2_5."""

from dataclasses import dataclass, field

from nanovl3.common import UserError

IMG_CONTEXT_ID = 151667  # <IMG_CONTEXT> in the released Qwen2.5 tokenizer


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
    model_type: str = "qwen2"  # "qwen3": no qkv bias, per-head q_norm/k_norm (text.py)
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
    system_message: str | None = None  # the checkpoint's own; None = the template's default
    # sample.py/training tiling (InternVL2.5 "Dynamic High-Resolution for Multimodal Data")
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    # ours: sampling shares max_dynamic_patch among a prompt's images, as training did (upstream
    # dataset.py); False = the model card's inference, every image the whole budget
    split_tiles: bool = False

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: (448/14)^2 * 0.5^2 = 256 for the released models."""
        grid = self.vision.image_size // self.vision.patch_size
        return int(grid * grid * self.downsample_ratio ** 2)


# -----------------------------------------------------------------------------
# presets (InternVL3 Table 1, arXiv 2504.10479)

def _qwen2(hidden, inter, layers, heads, kv_heads) -> TextConfig:
    return TextConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads)


def _qwen3(hidden, inter, layers, heads) -> TextConfig:
    """A Qwen3 base model's sizes (8 KV heads of 128 channels) with InternVL3.5's untied head."""
    return TextConfig(model_type="qwen3", vocab_size=151936, hidden_size=hidden,
                      intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=8, head_dim=128, max_position_embeddings=40960)


def _toy_text(hidden, inter, layers, heads, max_pos) -> TextConfig:
    return TextConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                      rope_theta=10000.0, max_position_embeddings=max_pos, tie_word_embeddings=True)


PRESETS = {
    "internvl3-1b": lambda: VLConfig(VisionConfig(), _qwen2(896, 4864, 24, 14, 2)),
    "internvl3-2b": lambda: VLConfig(VisionConfig(), _qwen2(1536, 8960, 28, 12, 2)),
    "internvl3-8b": lambda: VLConfig(VisionConfig(), _qwen2(3584, 18944, 28, 28, 4)),
    # InternVL3.5 Table 1 (arXiv 2508.18265): InternViT-300M + Qwen3-0.6B/1.7B/4B/8B. Its LLM sizes
    # (0.8/2.0/4.4/8.2B) count a separate lm_head of 151936 rows; the -HF 1B file holds exactly
    # 751,632,384 LLM weights = these shapes untied
    "internvl3.5-1b": lambda: VLConfig(VisionConfig(), _qwen3(1024, 3072, 28, 16)),
    "internvl3.5-2b": lambda: VLConfig(VisionConfig(), _qwen3(2048, 6144, 28, 16)),
    "internvl3.5-4b": lambda: VLConfig(VisionConfig(), _qwen3(2560, 9728, 36, 32)),
    "internvl3.5-8b": lambda: VLConfig(VisionConfig(), _qwen3(4096, 12288, 36, 32)),
    # trains in minutes on a laptop CPU: 112-px tiles of 8x8 patches -> 16 LLM tokens per tile
    "toy": lambda: VLConfig(VisionConfig(hidden_size=96, intermediate_size=384,
                                         num_attention_heads=4, num_hidden_layers=3,
                                         image_size=112),
                            _toy_text(192, 512, 4, 6, 4096), max_dynamic_patch=6, split_tiles=True),
    # the toy recipe sized for one GPU: 224-px tiles (64 LLM tokens each), wider, deeper ViT and LLM
    "toy-gpu": lambda: VLConfig(VisionConfig(hidden_size=256, intermediate_size=1024,
                                             num_attention_heads=4, num_hidden_layers=6,
                                             image_size=224),
                                _toy_text(512, 1536, 8, 8, 8192), max_dynamic_patch=6,
                                split_tiles=True),
}


def preset(name: str, **text_overrides) -> VLConfig:
    if name not in PRESETS:
        raise UserError(f"--preset: unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    cfg = PRESETS[name]()
    for k, v in text_overrides.items():
        setattr(cfg.text, k, v)
    return cfg
