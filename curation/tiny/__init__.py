"""Tiny random models of the real classes, built offline for tests and demos.

They are saved with `save_pretrained` and loaded back through the same `from_pretrained` path as a real checkpoint,
so the demo and the tests exercise the production code. Their captions and features are noise, by design.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_models(folder: str | Path) -> dict[str, Path]:
    """Build (or reuse) tiny LLaVA, T5 encoder, VAE, DC-AE (Sana's autoencoder) and CLIP checkpoints under `folder`,
    and LAION aesthetic and NSFW heads at the tiny CLIP's width; returns {name: path}."""
    from curation.tiny.clip import build_tiny_clip, build_tiny_heads
    from curation.tiny.llava import build_tiny_llava
    from curation.tiny.t5 import build_tiny_t5
    from curation.tiny.vae import build_tiny_dcae, build_tiny_vae

    root = Path(folder)
    built = {}
    builders = (
        ("llava", build_tiny_llava),
        ("t5", build_tiny_t5),
        ("vae", build_tiny_vae),
        ("dcae", build_tiny_dcae),
        ("clip", build_tiny_clip),
    )
    for name, build in builders:
        path = root / name
        if not (path / "config.json").exists():
            build(path)
        built[name] = path
    heads = {"aesthetic": root / "aesthetic-head.safetensors", "nsfw": root / "nsfw-head.safetensors"}
    if not all(p.exists() for p in heads.values()):
        build_tiny_heads(heads["aesthetic"], heads["nsfw"])
    return built | heads
