"""
Checkpoints: sharded files, dtype conversion, key errors that name the keys, config round trips.

    python -m pytest -q tests/test_model.py
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovl3.common import UserError
from nanovl3.checkpoint import config_from_json, config_to_json, to_hf_names, to_original_names
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
        cfg.max_dynamic_patch = back.max_dynamic_patch
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
