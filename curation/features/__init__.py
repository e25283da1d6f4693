"""Offline feature sidecars beside `images/`: same shard names and keys, one folder per sidecar.

    images/00042.tar (+ a caption set) ──features──▶ features/t5/00042.tar   <key>.t5.npy (L, D), <key>.t5mask.npy (L,)
                                                    features/vae512/00042.tar <key>.vae.npy (2C, h/8, w/8), <key>.json

`sidecar.py` is what the stage knows of a kind of feature (`FeatureKind`) and the sidecars seen as one shard
folder; `text.py` (T5) and `image.py` (VAE) are the kinds, `t5.py` and `vae.py` their models (loaded once in
`setup()`), `npy.py` the member format, `stage.py` the config, the `KINDS` list, the stage and `run_features`.
`curation.export.pixart` turns these shards into the trainer's layout.
"""

from __future__ import annotations

from typing import Any


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; asking for CUDA without one fails loudly."""
    import torch

    from curation.errors import SetupError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """Compute dtype: "auto" -> bfloat16 on CUDA (fast, no fp16 overflow), float32 on CPU (slow bf16)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)
