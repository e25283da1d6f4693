import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, T5EncoderModel, T5TokenizerFast

from curation.tiny.t5 import build_tiny_t5
from curation.tiny.vae import build_tiny_vae


def test_tiny_t5_loads_like_the_hub_checkpoint_with_t5_conventions(tmp_path):
    path = build_tiny_t5(tmp_path / "t5")
    for cls in (T5TokenizerFast, AutoTokenizer):
        tok = cls.from_pretrained(path)
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        ids = tok(["a dog on a bench"]).input_ids[0]
        assert ids[-1] == 1 and 2 not in ids  # EOS appended, every word known
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1  # sentinels at the end, like T5
    model = T5EncoderModel.from_pretrained(path).eval()
    assert model.config.vocab_size >= len(tok) and model.config.feed_forward_proj == "gated-gelu"
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).last_hidden_state
    assert out.shape == (1, len(ids), model.config.d_model) and torch.isfinite(out).all()


def test_tiny_builds_are_deterministic(tmp_path):
    a, b = build_tiny_t5(tmp_path / "a"), build_tiny_t5(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "spiece.model"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    va, vb = build_tiny_vae(tmp_path / "va"), build_tiny_vae(tmp_path / "vb")
    name = "diffusion_pytorch_model.safetensors"
    assert (va / name).read_bytes() == (vb / name).read_bytes()


def test_tiny_vae_downsamples_by_8_with_4_latent_channels(tmp_path):
    vae = AutoencoderKL.from_pretrained(build_tiny_vae(tmp_path / "vae")).eval()
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 96)).astype(np.float32))
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    assert dist.mean.shape == dist.std.shape == (1, 4, 8, 12)
    assert vae.config.scaling_factor == 0.18215
