"""Model checks on the driver, before any worker starts: a model that cannot load is refused in one line within
seconds, instead of after the workers started and the loader gave up (a local typo read as a Hub id, retried).

A model is a local folder (what `save_pretrained` wrote: it holds `config.json`) or a Hugging Face Hub id. A Hub id
is accepted when its `config.json` is in the local Hub cache (huggingface_hub's own lookup), else, unless offline
(`HF_HUB_OFFLINE=1`), when the Hub answers one request for it (no retries). On a cluster the driver checks its own
cache: the workers are expected to share it or to reach the Hub.
"""

from __future__ import annotations

import os

from curation.errors import ConfigError

HUB_TIMEOUT_S = 10  # one request, no retries: an unreachable Hub is refused in seconds


def check_model(name: str, flag: str, revision: str | None = None) -> None:
    """Refuse (ConfigError, one line naming `flag`, the model and the fix) a model that cannot load."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(
                f"{flag} {name}: the folder has no config.json, so it is not a saved model; pass the folder "
                "that save_pretrained wrote (or a Hugging Face Hub id)"
            )
        return
    if os.path.exists(path):
        raise ConfigError(f"{flag} {name} is a file; pass a model folder (with config.json) or a Hugging Face Hub id")
    if _local_path(name):
        raise ConfigError(
            f"{flag} {name}: no such folder ({os.path.abspath(path)}); check the path, or pass a Hugging Face Hub id"
        )
    _check_hub_id(name, flag, revision)


def _local_path(name: str) -> bool:
    """Whether `name` can only mean a local path: not a valid Hub id, or under a folder that exists here (a typo in
    `models/llava` is not the Hub repo `models/llava`)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "/", "~")) or os.sep != "/" and os.sep in name:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return "/" in name and os.path.isdir(name.split("/", 1)[0])


def _check_hub_id(name: str, flag: str, revision: str | None) -> None:
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    not_local = f"(no folder {os.path.abspath(name)} here either)"
    if constants.is_offline_mode():
        raise ConfigError(
            f"{flag} {name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
            f"{not_local}: download it first (`hf download {name}`) or pass a local model folder"
        )
    try:
        model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ConfigError(
            f"{flag} {name} is a gated model on the Hugging Face Hub: accept its terms on huggingface.co and log in "
            "(`hf auth login`), or pass a local model folder"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{flag} {name}: no such model on the Hugging Face Hub {not_local}; check the name or the path"
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(f"{flag} {name} has no revision {revision!r} on the Hugging Face Hub") from None
    except Exception as exc:  # noqa: BLE001 (whatever the one request raised, the Hub is out of reach: the network's)
        raise ConfigError(
            f"{flag} {name} is not in the Hugging Face cache and the Hub cannot be reached "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}) {not_local}: connect, or download it where "
            "the Hub is reachable and set HF_HUB_OFFLINE=1, or pass a local model folder"
        ) from None
