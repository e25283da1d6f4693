"""LAION's two heads on CLIP ViT-L/14 image embeddings, written out as torch modules, and their loading.

Both read the L2-normalised image embedding (`QualityModel.embed_images`):
- `AestheticMLP`: LAION's improved aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor, the `MLP`
  of its simple_inference.py), regressed on mean 1-10 human ratings (SAC, LAION-Logos, AVA). The published
  `sac+logos+ava1-l14-linearMSE.pth` is this stack with its activations commented out: linear layers and dropouts.
- `NSFWHead`: LAION's CLIP-based NSFW detector (LAION-AI/CLIP-based-NSFW-Detector), published for L/14 as an
  autokeras model: Keras normalisation, three Dense + ReLU, Dense, sigmoid; 1 means NSFW.
  `examples/convert_nsfw_keras.py` writes it as safetensors under these parameter names, which are also those of
  LAION's own PyTorch port (`models/clip_ViT-L-14_openai_binary_nsfw_head.pth`), so that file loads as it is.

A head loads from a local file or a Hub file named `repo_id/filename` (hf_hub_download: cached, HF_HUB_OFFLINE
honoured), as safetensors or as a state dict read by `torch.load(weights_only=True)`; a pickle of Python objects is
refused, never unpickled. The layer widths come from the file's tensors (tiny heads are the same classes); the input
width must be the CLIP model's embedding width. Every problem is a one-line `ConfigError` naming the flag and the fix.
"""

from __future__ import annotations

import os
import pickle
from typing import ClassVar

import torch
from torch import nn

from curation.errors import ConfigError
from curation.models import HUB_TIMEOUT_S

AESTHETIC_WIDTHS = (768, 1024, 128, 64, 16, 1)  # the published L/14 predictor's
NSFW_WIDTHS = (768, 64, 512, 256, 1)  # the published L/14 detector's


class AestheticMLP(nn.Module):
    """LAION improved aesthetic predictor v2: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations (the "linearMSE"
    weights), dropouts as trained (inactive in eval). Its output is the predicted mean rating, on a 1-10 scale."""

    linears: ClassVar[tuple[str, ...]] = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
    flag: ClassVar[str] = "--aesthetic-head"

    def __init__(self, widths: tuple[int, ...] = AESTHETIC_WIDTHS) -> None:
        super().__init__()
        w = widths
        self.layers = nn.Sequential(
            nn.Linear(w[0], w[1]),
            nn.Dropout(0.2),
            nn.Linear(w[1], w[2]),
            nn.Dropout(0.2),
            nn.Linear(w[2], w[3]),
            nn.Dropout(0.1),
            nn.Linear(w[3], w[4]),
            nn.Linear(w[4], w[5]),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


class KerasNormalization(nn.Module):
    """`keras.layers.Normalization` at inference: (x - mean) / max(sqrt(variance), epsilon), with the statistics it
    was adapted to as buffers."""

    EPSILON = 1e-7  # keras.backend.epsilon()

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("variance", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / torch.clamp(self.variance.sqrt(), min=self.EPSILON)


class NSFWHead(nn.Module):
    """LAION CLIP-based NSFW detector, L/14: normalisation, 768 -> 64 -> 512 -> 256 (ReLU each) -> 1, sigmoid.
    Its output is the probability that the image is NSFW."""

    linears: ClassVar[tuple[str, ...]] = ("linear_1", "linear_2", "linear_3", "linear_4")
    flag: ClassVar[str] = "--nsfw-head"

    def __init__(self, widths: tuple[int, ...] = NSFW_WIDTHS) -> None:
        super().__init__()
        w = widths
        self.norm = KerasNormalization(w[0])
        self.linear_1 = nn.Linear(w[0], w[1])
        self.linear_2 = nn.Linear(w[1], w[2])
        self.linear_3 = nn.Linear(w[2], w[3])
        self.linear_4 = nn.Linear(w[3], w[4])

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = self.norm(embeddings)
        x = torch.relu(self.linear_1(x))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x)).squeeze(-1)


HEADS: dict[str, type[AestheticMLP] | type[NSFWHead]] = {"aesthetic": AestheticMLP, "nsfw": NSFWHead}


def load_head(kind: str, source: str, dim: int | None = None, flag: str | None = None) -> nn.Module:
    """The `kind` head ("aesthetic" or "nsfw") with the weights of `source` (a local file or a Hub
    `repo_id/filename`), in eval mode on the CPU; `dim`, when given, is the embedding width it must read."""
    cls = HEADS[kind]
    flag = flag or cls.flag
    state = read_state_dict(resolve_head(source, flag), flag, source)
    names = [f"{name}.weight" for name in cls.linears]
    missing = [n for n in names if n not in state]
    if missing:
        raise ConfigError(
            f"{flag} {source} does not hold {cls.__name__} weights: it has no {missing[0]} (its keys: "
            f"{', '.join(sorted(state)[:6]) or 'none'}); pass the weights of {cls.__name__}'s architecture"
        )
    if any(state[n].ndim != 2 for n in names):
        raise ConfigError(f"{flag} {source}: its linear weights are not matrices; pass a {cls.__name__} state dict")
    widths = (state[names[0]].shape[1], *(state[n].shape[0] for n in names))
    if widths[-1] != 1:
        raise ConfigError(f"{flag} {source} has {widths[-1]} outputs; {cls.__name__} has one")
    if dim is not None and widths[0] != dim:
        raise ConfigError(
            f"{flag} {source} reads {widths[0]}-wide embeddings but the CLIP model makes {dim}-wide ones: pass the "
            "head trained on this CLIP model's embeddings (LAION's are for openai/clip-vit-large-patch14)"
        )
    head = cls(widths)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # size mismatches, unexpected or missing keys
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{flag} {source} does not fit {cls.__name__}: {detail[:240]}") from None
    return head.eval()


def resolve_head(source: str, flag: str) -> str:
    """The local path of a head file: `source` itself, or the Hub file `repo_id/filename` from the Hugging Face cache,
    downloaded first when not there (unless HF_HUB_OFFLINE=1). The Hub gets one request before the download (no
    retries), so an unreachable Hub is refused in seconds."""
    from huggingface_hub import constants, hf_hub_download, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {source} is a folder; pass a head file (.safetensors, or a state dict .pth)")
    no_file = f"{flag} {source}: no such file ({os.path.abspath(path)})"
    parts = source.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        repo_id = ""
    # A path that cannot be a Hub file, or under a folder that exists here, is a local file that is missing.
    if not filename or not repo_id or source.startswith((".", "/", "~")) or os.path.isdir(parts[0]):
        hint = " (examples/convert_nsfw_keras.py makes it from LAION's Keras model)" if flag == NSFWHead.flag else ""
        raise ConfigError(f"{no_file}{hint}; pass a head file, a Hub file as repo_id/filename, or {flag} none")
    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return cached
    fetch = f"download it where the Hub is reachable (`hf download {repo_id} {filename}`) or pass a local file"
    if constants.is_offline_mode():
        raise ConfigError(f"{flag} {source} is not in the Hugging Face cache and HF_HUB_OFFLINE=1: {fetch}")
    try:
        files = {s.rfilename for s in model_info(repo_id, files_metadata=False, timeout=HUB_TIMEOUT_S).siblings or ()}
    except GatedRepoError:
        raise ConfigError(f"{flag} {source}: {repo_id} is gated on the Hub: accept its terms and log in") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{no_file}, and the Hub has no repo {repo_id}; check the path or the name") from None
    except Exception as exc:  # noqa: BLE001 (whatever the one request raised, the Hub is out of reach: the network's)
        raise ConfigError(
            f"{flag} {source} is not in the Hugging Face cache and the Hub cannot be reached "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}): {fetch}"
        ) from None
    if filename not in files:
        raise ConfigError(f"{flag} {source}: the Hub repo {repo_id} has no file {filename}")
    return hf_hub_download(repo_id, filename)


def read_state_dict(path: str, flag: str, source: str) -> dict[str, torch.Tensor]:
    """{name: tensor} of a safetensors file or of a `torch.save(state_dict)` file, read without unpickling objects."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    fix = "save its weights with safetensors, or torch.save(model.state_dict(), path)"
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # torch.load(weights_only=True) met a class: a pickled object
            raise ConfigError(
                f"{flag} {source} is a pickle of Python objects, which is never loaded (it can run code): {fix}"
            ) from None
        raise ConfigError(f"{flag} {source} is not a torch state dict file: {fix}") from None
    except (SafetensorError, RuntimeError, EOFError, ValueError, OSError) as exc:
        detail = " ".join(str(exc).split())[:120]
        raise ConfigError(f"{flag} {source} cannot be read as a weights file ({detail}): {fix}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{flag} {source} holds a {type(state).__name__}, not a state dict of tensors: {fix}")
    return state
