"""One run per output at a time, and the record of what each stage last ran with."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import fsspec
import fsspec.implementations.local

from curation.errors import SetupError
from curation.layout import Layout
from curation.shards import write_json_atomic

_HELD_LOCKS: set[str] = set()


@contextlib.contextmanager
def output_lock(output: str) -> Iterator[None]:
    """One run per output at a time. A local flock dies with its process, so a SIGKILLed run never blocks a rerun.

    Object stores have no such lock: there, only one driver per output is supported (documented in the README).
    Re-entrant within a process: `curation run` holds it across its stages.
    """
    fs, root = fsspec.core.url_to_fs(output)
    held = os.path.realpath(root)
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem) or held in _HELD_LOCKS:
        yield
        return
    created = not os.path.exists(root)
    try:
        os.makedirs(root, exist_ok=True)
        fh = open(os.path.join(root, Layout(output).lock_file), "a+")
    except OSError as exc:
        raise SetupError(f"cannot write to the output {output}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise SetupError(
            f"another curation run is using {output} ({holder}); wait for it or use another output"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    fh.flush()
    _HELD_LOCKS.add(held)
    try:
        yield
    except BaseException:
        if created and not _has_done_shards(root):  # a refused or failed first run leaves no folder behind
            shutil.rmtree(root, ignore_errors=True)
        raise
    finally:
        _HELD_LOCKS.discard(held)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _has_done_shards(root: str) -> bool:
    """Whether a folder this run created holds any finished shard (kept: a rerun resumes from it)."""
    return any(name.endswith(".done.json") for _, _, names in os.walk(root) for name in names)


def record_run_config(layout: Layout, label: str, config: dict[str, Any]) -> None:
    """OUT/run_config.json keeps the resolved config of each pass's latest run (nanoGPT-style)."""
    url = layout.run_config
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)  # object-store listings are cached per process; another run may have written it
    current = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
    current.setdefault("stages", {})[label] = {
        **config,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "argv": sys.argv,
    }
    write_json_atomic(url, current)
