"""Tiny random models of the real classes, built offline for tests and demos.

They are saved with `save_pretrained` and loaded back through the same `from_pretrained` path as a real checkpoint,
so the demo and the tests exercise the production code. Their captions and features are noise, by design.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_models(folder: str | Path) -> dict[str, Path]:
    """Build (or reuse) tiny LLaVA, T5 encoder, VAE and DC-AE (Sana's autoencoder) checkpoints under `folder`;
    returns {name: path}."""
    from curation.tiny.llava import build_tiny_llava
    from curation.tiny.t5 import build_tiny_t5
    from curation.tiny.vae import build_tiny_dcae, build_tiny_vae

    root = Path(folder)
    built = {}
    builders = (("llava", build_tiny_llava), ("t5", build_tiny_t5), ("vae", build_tiny_vae), ("dcae", build_tiny_dcae))
    for name, build in builders:
        path = root / name
        if not (path / "config.json").exists():
            build(path)
        built[name] = path
    return built
