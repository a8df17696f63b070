import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests import their helpers (hf_reference.py) and the data scripts (toyworld.py, reasoning.py) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(ROOT, "data"))


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small toy world (the "small" size with 3 held-out questions per type), made once per test session."""
    import toyworld
    d = tmp_path_factory.mktemp("small_world") / "toy"
    toyworld.generate(str(d), seed=0, **{**toyworld.SIZES["small"], "n_eval": 3})
    return d


@pytest.fixture(scope="session")
def untrained_ckpt(small_world, tmp_path_factory):
    """A randomly initialised toy-preset checkpoint directory with the small world's tokenizer."""
    import torch

    from nanovl3.chat import Tokenizer
    from nanovl3.config import preset
    from nanovl3.model import InternVL
    tok = Tokenizer.from_dir(small_world)
    cfg = preset("toy")
    cfg.text.vocab_size, cfg.image_token_id = tok.vocab_size, tok.img_context_id
    torch.manual_seed(0)
    model = InternVL(cfg)
    model.init_weights()
    out = tmp_path_factory.mktemp("untrained") / "ckpt"
    model.save_pretrained(str(out), tokenizer=tok)
    return out
