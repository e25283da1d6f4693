"""Shards on disk: the unit of work. Written atomically, read back by name, done marker last.

Layout of one stage folder (`OUT/images/`, `OUT/captions/`, `OUT/features/t5/`, ...):
    NNNNN.tar        webdataset tar: `<key>.<ext>` members, grouped by key, sorted by key
    NNNNN.parquet    one row per sample, failed ones included
    NNNNN.done.json  written last: counts, timing, config hash. A shard without it does not exist.

Local outputs are written to a hidden temporary name in the same folder and renamed (atomic on POSIX). Object
stores (s3://, gs://) create an object atomically on upload, so the tar and index are uploaded to their final
names; the done marker, uploaded last, is what makes the shard visible either way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class StageDir:
    """One stage's folder of shards, local or remote (any fsspec URL)."""

    url: str

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.url)[0]

    @property
    def root(self) -> str:
        return fsspec.core.url_to_fs(self.url)[1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def done_shards(self) -> list[str]:
        """Names (`00042`) of the shards whose done marker exists, sorted."""
        fs = self.fs
        if not fs.exists(self.root):
            return []
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(self.root, detail=False)]
        return sorted(
            n.removesuffix(".done.json") for n in names if n.endswith(".done.json") and not n.startswith(TMP_PREFIX)
        )

    def read_done(self, shard: str) -> dict[str, Any]:
        with self.fs.open(self.path(f"{shard}.done.json"), "rb") as f:
            return json.load(f)

    def read_index(self, shard: str) -> pa.Table:
        with self.fs.open(self.path(f"{shard}.parquet"), "rb") as f:
            return pq.read_table(f)

    def iter_samples(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {extension: bytes}) for each sample of a shard's tar, in file order (members are grouped by key)."""
        with self.fs.open(self.path(f"{shard}.tar"), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                base, _, ext = info.name.partition(".")
                if key is not None and base != key:
                    yield key, members
                    members = {}
                key = base
                members[ext] = tar.extractfile(info).read()
            if key is not None:
                yield key, members

    def remove_stale_temporaries(self) -> None:
        """Temporaries left by a killed run; never visible as shards, removed so they do not pile up."""
        fs = self.fs
        if fs.exists(self.root):
            for p in fs.ls(self.root, detail=False):
                if p.rsplit("/", 1)[-1].startswith(TMP_PREFIX):
                    fs.rm(p)


def config_hash(semantics: dict[str, Any]) -> str:
    """Hash of what decides a stage's output; kept in each done marker so a changed config is caught on rerun."""
    return hashlib.sha256(json.dumps(semantics, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed owner and mtime: the same input gives byte-identical shards, whichever worker wrote them.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "curation", "curation"
    return info


class ShardWriter:
    """Write one shard: samples into a local temporary tar, then `commit()` publishes tar, index, done marker."""

    def __init__(self, stage: StageDir, shard: str) -> None:
        self.stage, self.shard = stage, shard
        self._started = time.time()
        self._tmpdir = tempfile.TemporaryDirectory(prefix="curation-shard-")
        self._tar_path = Path(self._tmpdir.name) / f"{shard}.tar"
        self._tar = tarfile.open(self._tar_path, "w", format=tarfile.GNU_FORMAT)
        self._keys: set[str] = set()

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample's members ({"jpg": ..., "json": ...}); a key may be written once."""
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in shard {self.shard}")
        if "." in key or "/" in key:
            raise ValueError(f"unsafe key {key!r}: keys may not contain dots or slashes")
        self._keys.add(key)
        for ext in sorted(members):
            data = members[ext]
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))

    def commit(self, index: pa.Table, done: dict[str, Any]) -> dict[str, Any]:
        """Publish the shard: tar, then parquet index, then the done marker (last, so it marks completeness)."""
        self._tar.close()
        index_buf = io.BytesIO()
        pq.write_table(index, index_buf, compression="zstd")
        done = {
            "shard": self.shard,
            "members": len(self._keys),
            "rows": index.num_rows,
            "seconds": round(time.time() - self._started, 3),
            **done,
        }
        self._publish_file(self._tar_path, f"{self.shard}.tar")
        self._publish_bytes(index_buf.getvalue(), f"{self.shard}.parquet")
        self._publish_bytes(json.dumps(done, indent=1, sort_keys=True).encode(), f"{self.shard}.done.json")
        self._tmpdir.cleanup()
        return done

    def abort(self) -> None:
        self._tar.close()
        self._tmpdir.cleanup()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _publish_file(self, local: Path, name: str) -> None:
        stage = self.stage
        if stage.is_local:
            os.makedirs(stage.root, exist_ok=True)
            tmp = stage.path(f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
            with open(local, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, stage.path(name))
        else:
            stage.fs.put_file(str(local), stage.path(name))

    def _publish_bytes(self, data: bytes, name: str) -> None:
        local = Path(self._tmpdir.name) / name
        local.write_bytes(data)
        self._publish_file(local, name)


def write_json_atomic(url: str, payload: dict[str, Any]) -> None:
    """Small JSON files beside the shards (run_config.json, reports), written atomically too."""
    fs, path = fsspec.core.url_to_fs(url)
    data = json.dumps(payload, indent=1, sort_keys=True, default=str).encode()
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{TMP_PREFIX}{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)
