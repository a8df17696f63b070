"""
Checkpoints: sharded files, dtype conversion, key errors that name the keys, config round trips.

    python -m pytest -q tests/test_model.py
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovl3.common import UserError
from nanovl3.checkpoint import (config_from_json, config_to_json, read_config, to_hf_names,
                                to_original_names)
from nanovl3.config import PRESETS, preset
from nanovl3.model import InternVL, pixel_unshuffle


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = preset("toy")
    cfg.image_token_id = 1000
    torch.manual_seed(0)
    m = InternVL(cfg)
    m.init_weights(std=0.1)
    d = tmp_path_factory.mktemp("m") / "ckpt"
    m.save_pretrained(d)
    return m, d


def logits(m):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 900, (1, 40), generator=g)
    ids[0, 4:20] = 1000
    with torch.no_grad():
        return m(ids, torch.randn(1, 3, 112, 112, generator=g))


def test_sharded_checkpoint_loads(saved, tmp_path):
    m, d = saved
    sd = load_file(d / "model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    assert torch.equal(logits(InternVL.from_pretrained(tmp_path)), logits(m))


def test_bf16_checkpoint_loads_as_requested_dtype(saved, tmp_path):
    m, d = saved
    m16 = InternVL.from_pretrained(d, dtype=torch.bfloat16)
    m16.save_pretrained(tmp_path / "bf16")
    assert (load_file(tmp_path / "bf16" / "model.safetensors")["mlp1.1.weight"].dtype
            == torch.bfloat16)
    m32 = InternVL.from_pretrained(tmp_path / "bf16", dtype="float32")
    assert all(p.dtype == torch.float32 for p in m32.parameters())
    # still tied
    assert m32.language_model.lm_head.weight is m32.language_model.model.embed_tokens.weight
    assert (logits(m32) - logits(m)).abs().max().item() < 0.5  # bf16 rounding only


@pytest.mark.parametrize("change,msg", [
    (lambda sd: sd.pop("mlp1.0.bias"), "1 missing keys: mlp1.0.bias"),
    (lambda sd: sd.update(extra=torch.zeros(1)), "1 unexpected keys: extra"),
    (lambda sd: sd.update({"mlp1.0.bias": torch.zeros(3)}), "mlp1.0.bias has shape [3]"),
])
def test_key_errors_name_the_keys(saved, tmp_path, change, msg):
    m, d = saved
    sd = load_file(d / "model.safetensors")
    change(sd)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(UserError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        InternVL.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("layout", ["original", "hf"])
def test_config_round_trip(name, layout):
    cfg = preset(name)
    back, detected = config_from_json(json.loads(json.dumps(config_to_json(cfg, layout))))
    assert detected == layout
    if layout == "hf":  # -hf keeps the tiling defaults in the processor config, not in config.json
        cfg.max_dynamic_patch, cfg.split_tiles = back.max_dynamic_patch, back.split_tiles
    assert back == cfg


def test_hf_names_round_trip(saved):
    m, _ = saved
    sd = m.state_dict()
    hf = to_hf_names(sd)
    assert "vision_tower.encoder.layer.0.attention.q_proj.weight" in hf
    assert "multi_modal_projector.linear_1.weight" in hf
    back = to_original_names(hf)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_pixel_unshuffle_channel_order():
    """Token (i, j) = concat(x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]) (ps_version v2)."""
    x = torch.randn(2, 8, 8, 3)
    y = pixel_unshuffle(x)
    assert y.shape == (2, 4, 4, 12)
    for i, j in [(0, 0), (1, 3), (3, 2)]:
        want = torch.cat([x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1], x[:, 2 * i + 1, 2 * j],
                          x[:, 2 * i + 1, 2 * j + 1]], -1)
        assert torch.equal(y[:, i, j], want)


@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("llm,msg", [
    (dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"]), "not MoE, GPT-OSS"),
    (dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"]), "GptOssForCausalLM"),
    (dict(model_type="qwen3", attention_bias=True), "attention_bias"),
])
def test_unsupported_language_models_are_named(layout, llm, msg):
    d = config_to_json(preset("internvl3.5-1b"), layout)
    d["llm_config" if layout == "original" else "text_config"].update(llm)
    with pytest.raises(UserError, match=msg) as e:
        config_from_json(d)
    assert "Qwen2" in str(e.value) or "attention_bias" in msg  # names what is supported


def test_qwen3_config_fields_and_the_checkpoints_own_prompt():
    d = config_to_json(preset("internvl3.5-4b"), "original")
    assert d["llm_config"]["architectures"] == ["Qwen3ForCausalLM"]
    del d["llm_config"]["head_dim"]  # Qwen3Config's default is 128, not hidden_size // heads
    d["system_message"] = "You are a helpful assistant."
    cfg, _ = config_from_json(d)
    assert cfg.text.model_type == "qwen3" and cfg.text.head_dim == 128 != 2560 // 32
    assert cfg.system_message == "You are a helpful assistant."
    d["template"] = "Hermes-2"
    with pytest.raises(UserError, match="template 'Hermes-2' is not supported"):
        config_from_json(d)


# -----------------------------------------------------------------------------
# a config.json of the wrong shape, weights of the wrong dtype: one line naming the file and key

def set_key(d, key, value):
    *outer, last = key.split(".")
    for k in outer:
        d = d[k]
    d[last] = value


BAD_CONFIGS = [  # (layout, key or None = the whole file, value, the message's key)
    (None, None, [1, 2], "expected a JSON object, got [1, 2]"),
    (None, None, "internvl", 'expected a JSON object, got "internvl"'),
    ("original", "vision_config", "ViT", 'vision_config = "ViT": expected a JSON object'),
    ("hf", "vision_config", [448], "vision_config = [448]: expected a JSON object"),
    ("original", "llm_config", None, "llm_config = null: expected a JSON object"),
    ("hf", "text_config", None, "text_config = null: expected a JSON object"),
    ("original", "llm_config", 7, "llm_config = 7: expected a JSON object"),
    ("original", "llm_config.hidden_size", "big", 'llm_config.hidden_size = "big": expected'),
    ("hf", "text_config.num_attention_heads", 0, "text_config.num_attention_heads = 0: expected"),
    ("hf", "text_config.rope_parameters", 5, "text_config.rope_parameters = 5: expected a JSON"),
    ("original", "llm_config.architectures", "Qwen2ForCausalLM", "llm_config.architectures ="),
    ("original", "llm_config.model_type", ["qwen2"], "llm_config.model_type = [\"qwen2\"]"),
    ("original", "vision_config.qkv_bias", "yes", 'vision_config.qkv_bias = "yes": expected true'),
    ("hf", "vision_config.image_size", [448], "vision_config.image_size = [448]: only square"),
    ("original", "max_dynamic_patch", 0, "max_dynamic_patch = 0: expected an integer >= 1"),
    ("original", "downsample_ratio", "half", 'downsample_ratio = "half": expected a number'),
    ("original", "split_tiles", "yes", 'split_tiles = "yes": expected true or false'),
    ("hf", "image_token_id", 1.5, "image_token_id = 1.5: expected an integer"),
]


@pytest.mark.parametrize("layout,key,value,msg", BAD_CONFIGS)
def test_bad_config_shapes_are_one_line_naming_the_key(tmp_path, layout, key, value, msg):
    d = config_to_json(preset("toy"), layout or "original")
    if key is None:
        d = value
    else:
        set_key(d, key, value)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(UserError) as e:
        read_config(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: ") and msg in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype,msg", [(torch.int32, "has dtype torch.int32; weights must be"),
                                       (torch.float8_e4m3fn, "has dtype F8_E4M3, which nanovl3")])
def test_weights_of_other_dtypes_are_named(saved, tmp_path, dtype, msg):
    m, d = saved
    sd = load_file(d / "model.safetensors")
    sd["mlp1.0.bias"] = sd["mlp1.0.bias"].to(dtype)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(UserError, match="mlp1.0.bias " + msg):
        InternVL.from_pretrained(tmp_path)


def test_split_tiles_is_recorded_and_absent_means_the_model_card(saved):
    m, d = saved
    assert json.loads((d / "config.json").read_text())["split_tiles"] is True  # toy: as trained
    assert InternVL.from_pretrained(d).cfg.split_tiles
    released = config_to_json(preset("internvl3-1b"))
    del released["split_tiles"]  # OpenGVLab's config.json has no such key
    assert config_from_json(released)[0].split_tiles is False
