import pytest


def pytest_collection_modifyitems(items):
    """Tests marked cuda are skipped on a machine without CUDA."""
    import torch
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small toy world (size "small", 3 held-out questions per type), made once per session."""
    from data import toyworld
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
