"""Reliability tests: real processes, real signals, a real S3 server, a multi-node Ray on this machine.

Each fault is compared with an uninterrupted run of the same input: same keys, same captions, no key twice,
no temporary left visible.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`curation ...` in a fresh Python process, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "curation.cli", *args], env=full_env, capture_output=True, text=True, timeout=timeout
    )


def one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    """The run failed as a user error: exit 2, stderr exactly one `curation <command>: error:` line, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"curation {command}: error: "), proc.stderr[-3000:]
    return lines[0]


def assert_only_done_shards(folder: Path) -> None:
    """Every file of a local stage folder belongs to a done shard: no temporaries, no half shard."""
    names = [p.name for p in folder.iterdir()]
    done = {n.removesuffix(".done.json") for n in names if n.endswith(".done.json")}
    strays = [n for n in names if n.split(".", 1)[0] not in done]
    assert not strays, f"files outside done shards: {strays}"
