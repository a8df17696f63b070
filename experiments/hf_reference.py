"""
Small random checkpoints of transformers' InternVL (the reference), in both layouts, for the parity
tests and bench.py.

    ref, hf_dir, orig_dir = make_reference(tmp_path, tie=False, vit6b=False, llm="qwen2")

llm="qwen3" builds the InternVL3.5 shape: a Qwen3 text model (per-head q/k norm, no qkv bias) with
an explicit head_dim, so that heads * head_dim (96) differs from the hidden size (64).

`hf_dir` is written by transformers' own save_pretrained. `orig_dir` is the OpenGVLab layout,
produced here by inverting the key renames of transformers'
src/transformers/models/internvl/convert_internvl_weights_to_hf.py by hand (written independently
of nanovl3's key table, so a mistake there cannot cancel out).
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file

IMAGE_TOKEN_ID = 1000  # placed inside the small vocab


def reference_config(tie=False, vit6b=False, width=64, layers=2, vocab=1024, image_size=448,
                     text_width=None, text_layers=None, text_inter=None, heads=4, kv_heads=2,
                     vit_inter=None, llm="qwen2"):
    from transformers import InternVLConfig
    vision = dict(hidden_size=width, intermediate_size=vit_inter or 2 * width,
                  num_attention_heads=heads, num_hidden_layers=layers, image_size=image_size,
                  patch_size=14, layer_norm_eps=1e-6,
                  norm_type="rms_norm" if vit6b else "layer_norm", attention_bias=not vit6b,
                  use_qk_norm=vit6b)
    tw = text_width or width
    text = dict(model_type="qwen2", vocab_size=vocab, hidden_size=tw,
                intermediate_size=text_inter or 2 * tw, num_hidden_layers=text_layers or layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=1e6,
                max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if llm == "qwen3":
        text.update(model_type="qwen3", head_dim=24, attention_bias=False)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                          image_seq_length=(image_size // 14) ** 2 // 4, tie_word_embeddings=tie)


@torch.no_grad()
def scramble(model, seed=0):
    """Re-draw every weight so each part moves the logits: unit-ish norms, O(1) layer scales,
    visible biases."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * r)
        elif "lambda" in name:
            p.copy_(0.5 + 0.2 * r)
        elif name.endswith("bias") or "norm" in name:
            p.copy_(0.2 * r)
        elif "cls_token" in name or "position_embeddings" in name:
            p.copy_(0.5 * r)
        elif "embed_tokens" in name:
            # unit scale: greedy decoding of an untied model then wanders over many tokens
            p.copy_(r)
        else:  # matrices and the patch conv: fan-in scaling keeps activations O(1)
            fan_in = p[0].numel()
            p.copy_(r / fan_in ** 0.5)


def make_reference(root, tie=False, vit6b=False, seed=0, llm="qwen2", **kw):
    """-> (transformers model in fp32 eval mode, hf_dir, orig_dir)."""
    from transformers import InternVLForConditionalGeneration
    torch.manual_seed(seed)
    ref = InternVLForConditionalGeneration(reference_config(tie=tie, vit6b=vit6b, llm=llm, **kw))
    ref = ref.eval()
    scramble(ref, seed)
    name = f"tie{int(tie)}-6b{int(vit6b)}-{llm}"
    hf_dir = os.path.join(str(root), f"hf-{name}")
    ref.save_pretrained(hf_dir)
    orig_dir = os.path.join(str(root), f"orig-{name}")
    write_original_layout(hf_dir, orig_dir)
    return ref, hf_dir, orig_dir


def write_original_layout(hf_dir, orig_dir):
    """Invert convert_internvl_weights_to_hf.py: -hf safetensors + config -> OpenGVLab
    InternVLChatModel layout."""
    os.makedirs(orig_dir, exist_ok=True)
    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.startswith("vision_tower."):
            k = "vision_model." + k[len("vision_tower."):]
            k = (k.replace("embeddings.cls_token", "embeddings.class_embedding")
                 .replace("embeddings.position_embeddings", "embeddings.position_embedding")
                 .replace("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding.")
                 .replace("encoder.layer.", "encoder.layers.")
                 .replace("attention.projection_layer.", "attn.proj.")
                 .replace("attention.q_norm.", "attn.q_norm.")
                 .replace("attention.k_norm.", "attn.k_norm.")
                 .replace("layernorm_before.", "norm1.").replace("layernorm_after.", "norm2.")
                 .replace("lambda_1", "ls1").replace("lambda_2", "ls2"))
        elif k.startswith("multi_modal_projector."):
            k = (k.replace("multi_modal_projector.layer_norm.", "mlp1.0.")
                 .replace("multi_modal_projector.linear_1.", "mlp1.1.")
                 .replace("multi_modal_projector.linear_2.", "mlp1.3."))
        out[k] = v
    # fuse q/k/v of the ViT into qkv (rows [q; k; v])
    for k in [k for k in out if ".attention.q_proj." in k]:
        fused = k.replace(".attention.q_proj.", ".attn.qkv.")
        parts = [out.pop(k.replace(".q_proj.", f".{p}_proj.")) for p in "qkv"]
        out[fused] = torch.cat(parts, dim=0)
    save_file(out, os.path.join(orig_dir, "model.safetensors"))

    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    v, t = cfg["vision_config"], cfg["text_config"]
    rope_theta = t.get("rope_theta") or (t.get("rope_parameters") or {}).get("rope_theta")
    llm = {k: t[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                             "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                             "max_position_embeddings", "bos_token_id", "eos_token_id") if k in t}
    if t["model_type"] == "qwen3":  # InternVL3.5: a Qwen3Config dict, head_dim explicit
        llm.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=t["head_dim"],
                   attention_bias=False)
    else:
        llm.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    llm.update(rope_theta=rope_theta,
               rope_scaling={"type": "dynamic", "factor": 2.0},
               tie_word_embeddings=cfg.get("tie_word_embeddings"))
    vision = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b",
                  hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                  num_attention_heads=v["num_attention_heads"],
                  num_hidden_layers=v["num_hidden_layers"], image_size=v["image_size"][0],
                  patch_size=v["patch_size"][0], norm_type=v["norm_type"],
                  layer_norm_eps=v["layer_norm_eps"], qkv_bias=v["attention_bias"],
                  qk_normalization=v["use_qk_norm"], hidden_act="gelu", initializer_factor=0.1,
                  drop_path_rate=0.0, use_moe=False, num_experts=8)
    orig = dict(architectures=["InternVLChatModel"], model_type="internvl_chat",
                vision_config=vision, llm_config=llm, downsample_ratio=0.5, ps_version="v2",
                select_layer=-1, template="internvl2_5", force_image_size=v["image_size"][0],
                dynamic_image_size=True, max_dynamic_patch=12, min_dynamic_patch=1,
                use_thumbnail=True, tie_word_embeddings=cfg.get("tie_word_embeddings"),
                img_context_token_id=cfg["image_token_id"], system_message=None)
    with open(os.path.join(orig_dir, "config.json"), "w") as f:
        json.dump(orig, f, indent=2)
