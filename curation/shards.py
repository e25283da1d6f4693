"""Shards on disk: the unit of work. Written atomically, read back by name, done marker last.

Layout of one stage folder (`OUT/images/`, `OUT/captions/`, `OUT/features/t5/`, ...):
    NNNNN.tar        webdataset tar: `<key>.<ext>` members, grouped by key, sorted by key
    NNNNN.parquet    one row per sample, failed ones included
    NNNNN.done.json  written last: counts, timing, config hash. A shard without it does not exist.

Local outputs are written to a hidden temporary name in the same folder (`.tmp-*`, never listed as a shard) and
renamed (atomic on POSIX). Object stores (s3://, gs://) create an object atomically on upload, so the tar and index
are uploaded to their final names; the done marker, uploaded last, is what makes the shard visible either way.
A write that fails (disk full, unwritable output, lost credentials) removes what it had published of its shard and
raises `ShardWriteError` naming the file, so a failed shard leaves nothing behind but, at most, a hidden temporary.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq

from curation.errors import ShardError

TMP_PREFIX = ".tmp-"


class ShardWriteError(OSError):
    """A shard could not be written; the message names the file and the cause (e.g. no space left on device)."""


class ShardReadError(ShardError):
    """A file of a done shard cannot be read, or is not what its done marker recorded: one line naming the file and
    the command that rewrites it."""


@dataclass(frozen=True)
class StageDir:
    """One stage's folder of shards, local or remote (any fsspec URL). `command` is the CLI command that writes it
    (`ingest`, `caption --name dense`): what an error about a damaged shard tells the user to run again."""

    url: str
    command: str = ""

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
        """A file of this folder, as the filesystem (`self.fs`) names it."""
        return f"{self.root.rstrip('/')}/{name}"

    def url_of(self, name: str) -> str:
        """A file of this folder, as a URL (for writers that take one)."""
        return f"{self.url.rstrip('/')}/{name}"

    def done_shards(self) -> list[str]:
        """Names (`00042`) of the shards whose done marker exists, sorted."""
        names = [p.rsplit("/", 1)[-1] for p in self._listing()]
        return sorted(
            n.removesuffix(".done.json") for n in names if n.endswith(".done.json") and not n.startswith(TMP_PREFIX)
        )

    def read_done(self, shard: str) -> DoneMarker:
        with self.fs.open(self.path(f"{shard}.done.json"), "rb") as f:
            return DoneMarker.from_json(json.load(f))

    def has_done(self, shard: str) -> bool:
        return self.fs.exists(self.path(f"{shard}.done.json"))

    def read_dones(self, shards: list[str]) -> dict[str, DoneMarker]:
        """Many done markers at once: object stores fetch them concurrently (11k shards: seconds, not minutes)."""
        if not shards:
            return {}
        paths = {self.path(f"{s}.done.json"): s for s in shards}
        raw = self.fs.cat(list(paths))
        return {paths[self.fs._strip_protocol(p)]: DoneMarker.from_json(json.loads(data)) for p, data in raw.items()}

    def write_index(self, shard: str, table: pa.Table) -> FileRecord:
        """Publish a shard's parquet alone, atomically (a shard with no tar: keep flags, hashes, edges); returns its
        record for the done marker's `files`."""
        return self.write_file(f"{shard}.parquet", parquet_bytes(table))

    def write_file(self, name: str, data: bytes) -> FileRecord:
        """Publish one file of a shard atomically; returns its record for the done marker's `files`."""
        write_bytes_atomic(self.url_of(name), data)
        return file_record(data)

    def write_done(self, done: DoneMarker) -> DoneMarker:
        """Publish a done marker alone (a shard whose other files were written atomically before it)."""
        write_json_atomic(self.url_of(f"{done.shard}.done.json"), done.to_json())
        return done

    def file_sizes(self, names: list[str] | None = None) -> dict[str, int]:
        """{file name: size} of this folder's files, from one listing (object stores: one paged call, no read);
        with `names`, of those files only (one stat each), the missing ones left out."""
        fs = self.fs
        if names is None:
            if self.is_local:  # os.scandir: a third of fsspec's per-entry cost (1,000 shards: 3,000 entries)
                with contextlib.suppress(FileNotFoundError), os.scandir(self.root) as entries:
                    return {e.name: e.stat().st_size for e in entries if e.is_file()}
                return {}
            fs.invalidate_cache(self.root)
            if not fs.exists(self.root):
                return {}
            return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in fs.ls(self.root, detail=True)}
        sizes = {}
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                sizes[name] = fs.size(self.path(name))
        return sizes

    def damage(self, shard: str, error: BaseException | str) -> ShardReadError:
        """The one-line error for a file of `shard` that cannot be read as written. Removing the marker is the fix
        that always works: a rerun redoes a shard whose file is missing or cut short, but not one changed in place."""
        command = f"`curation {self.command}`" if self.command else "the stage that writes it"
        return ShardReadError(
            f"{self.url}: shard {shard} is damaged ({_one_line(error)}); to rewrite it, delete "
            f"{self.path(shard + '.done.json')} and run {command} again (`curation verify --output OUT` lists every "
            "damaged shard)"
        )

    def read_index(self, shard: str) -> pa.Table:
        try:
            return read_parquet(self.fs, self.path(f"{shard}.parquet"))
        except (OSError, pa.ArrowException) as exc:
            raise self.damage(shard, f"{shard}.parquet: {type(exc).__name__}: {exc}") from exc

    def _recorded(self, shard: str, name: str) -> dict[str, int] | None:
        """What the shard's done marker recorded of one of its files; None without a record (an older marker), or
        without a marker (tars read as plain webdataset shards, e.g. an export's)."""
        try:
            return (self.read_done(shard).files or {}).get(name)
        except FileNotFoundError:
            return None

    def iter_samples(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {extension: bytes}) for each sample of a shard's tar, in file order (members are grouped by key).

        A tar cut at a member boundary reads as a shorter archive, so its size is first held to the one its done
        marker recorded (one stat); a tar that cannot be read is a `ShardReadError`.
        """
        name = f"{shard}.tar"
        try:
            recorded = self._recorded(shard, name)
            if recorded is not None and (size := self.fs.size(self.path(name))) != recorded["size"]:
                raise self.damage(shard, f"{name} is {size} bytes, its done marker recorded {recorded['size']}")
            with self.fs.open(self.path(name), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
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
        except (OSError, tarfile.TarError, ValueError) as exc:
            raise self.damage(shard, f"{name}: {type(exc).__name__}: {exc}") from exc

    def read_member(self, shard: str, name: str, offset: int | None = None, size: int | None = None) -> bytes:
        """One member of a shard's tar: a byte range where its data offset and size are known (`images/` indexes
        record them), else found by walking the tar's headers (seeking past the data, not reading it)."""
        with self.fs.open(self.path(f"{shard}.tar"), "rb") as f:
            if offset is not None and size is not None:
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise FileNotFoundError(f"{self.path(f'{shard}.tar')} ends inside member {name}")
                return data
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if info.name == name and info.isfile():
                        return tar.extractfile(info).read()
        raise FileNotFoundError(f"{self.path(f'{shard}.tar')} has no member {name}")

    def remove_stale_temporaries(self) -> None:
        """Temporaries left by a killed writer; never visible as shards, removed so they do not pile up.

        Only safe while no writer of this folder runs: the runner calls it under the output lock, before and after
        its workers.
        """
        for p in self._listing():
            if p.rsplit("/", 1)[-1].startswith(TMP_PREFIX):
                self.fs.rm(p, recursive=True)

    def remove_shard(self, shard: str) -> None:
        """Unpublish a shard: its done marker first, so it is never seen done without its files."""
        fs = self.fs
        for name in (f"{shard}.done.json", f"{shard}.tar", f"{shard}.parquet"):
            with contextlib.suppress(FileNotFoundError):
                fs.rm(self.path(name))

    def _listing(self) -> list[str]:
        # s3fs/gcsfs cache listings for the life of the (shared, cached) filesystem object; shards are written by
        # other processes, so a cached listing would hide new shards or show removed ones.
        fs = self.fs
        fs.invalidate_cache(self.root)
        if not fs.exists(self.root):
            return []
        return fs.ls(self.root, detail=False)


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """A whole parquet file, decoded on the calling thread.

    Read from a Python file object, the pages are Python-owned buffers. With Arrow's thread pool (`use_threads`, or
    `pq.read_table`'s dataset), a pool thread may still be releasing such a buffer when the process exits; it then
    needs the GIL of a finalizing interpreter, and the process aborts (SIGABRT) after a run that finished its work
    (seen in CI: `PyBuffer::~PyBuffer` <- `SerializedPageReader` on an Arrow pool thread). These files are small:
    one thread costs nothing.
    """
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read(columns=columns, use_threads=False)


# Fields a done marker always means the same thing by; everything else a stage adds is kept in `extra`.
_CORE = ("shard", "stage", "rows", "config_hash", "input_lineage", "lineage", "seconds", "files")

# A published file as its done marker records it: {"size": bytes, "crc32": zlib.crc32 of the bytes}.
FileRecord = dict[str, int]


def file_record(data: bytes) -> FileRecord:
    return {"size": len(data), "crc32": zlib.crc32(data)}


def damaged_files(files: dict[str, FileRecord] | None, sizes: dict[str, int]) -> list[str]:
    """What is wrong with a done shard's files, given their sizes now ({name: size}, missing files left out):
    ["00042.tar missing", "00042.parquet is 812 bytes, 1024 recorded"]. A marker without `files` (written before
    they were recorded) is trusted: []."""
    out = []
    for name, record in sorted((files or {}).items()):
        size = sizes.get(name)
        if size is None:
            out.append(f"{name} missing")
        elif size != record["size"]:
            out.append(f"{name} is {size} bytes, {record['size']} recorded")
    return out


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    return buf.getvalue()


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@dataclass
class DoneMarker:
    """`<shard>.done.json`: written last, so a shard without one does not exist.

    `counts` holds the `by_*` tallies (by_status, by_reason, by_skipped, ...): the run summary totals them.
    `lineage` hashes this shard's config with its input's lineage; a downstream shard whose `input_lineage` no
    longer matches is redone. `complete` is False for a composite shard that lacks a part (a feature sidecar).
    `files` records each file the shard published ({name: FileRecord}): a rerun redoes a shard whose files are
    missing or changed size, `curation verify` checks their checksums. None on markers written before it existed.
    """

    shard: str
    stage: str | None = None
    rows: int = 0
    config_hash: str | None = None
    input_lineage: str | None = None
    lineage: str | None = None
    seconds: float | None = None
    complete: bool = True
    files: dict[str, FileRecord] | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in _CORE if getattr(self, k) is not None}
        if not self.complete:
            out["complete"] = False
        return {**out, **self.counts, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DoneMarker:
        core = {k: data[k] for k in _CORE if k in data}
        counts = {k: v for k, v in data.items() if k.startswith("by_") and isinstance(v, dict)}
        extra = {k: v for k, v in data.items() if k not in core and k not in counts and k != "complete"}
        return cls(**core, complete=data.get("complete", True), counts=counts, extra=extra)

    @property
    def upstream(self) -> str:
        """This shard's lineage as a later stage sees it ("" when the stage keeps none)."""
        return self.lineage or ""


def lineage(chash: str, input_lineage: str | None) -> dict[str, str]:
    """DoneMarker fields that tie a shard to its config and to what it was made from (`input_lineage`)."""
    upstream = input_lineage or ""
    return {
        "config_hash": chash,
        "input_lineage": upstream,
        "lineage": config_hash({"config": chash, "input": upstream}),
    }


def read_parquet_range(fs: fsspec.AbstractFileSystem, path: str, start: int, stop: int | None) -> pa.Table:
    """Rows [start, stop) of a parquet file, decoding only the row groups they lie in (on the calling thread, as
    `read_parquet`)."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        stop = pf.metadata.num_rows if stop is None else stop
        groups, first, offset = [], 0, 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < stop and offset + n > start:
                first = offset if not groups else first
                groups.append(g)
            offset += n
        table = pf.read_row_groups(groups, use_threads=False) if groups else pf.schema_arrow.empty_table()
    return table.slice(start - first, max(0, stop - start))


def config_hash(semantics: dict[str, Any]) -> str:
    """Hash of what decides a stage's output; kept in each done marker so a changed config is caught on rerun."""
    return hashlib.sha256(json.dumps(semantics, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed owner and mtime: the same input gives byte-identical shards, whichever worker wrote them.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "curation", "curation"
    return info


class ShardWriter:
    """Write one shard: `add()` samples, then `commit()` publishes tar, index and done marker, in that order.

    Local folders: the tar grows under a hidden temporary name beside its final one (no second copy of the bytes;
    a killed writer's temporary is removed by the next run). Object stores: it grows in a local temporary folder
    and is uploaded whole on commit.
    """

    def __init__(self, stage: StageDir, shard: str) -> None:
        self.stage, self.shard = stage, shard
        self._started = time.time()
        self._keys: set[str] = set()
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._closed = False
        try:
            if stage.is_local:
                os.makedirs(stage.root, exist_ok=True)
                self._tar_path = Path(stage.path(_tmp_name(f"{shard}.tar")))
            else:
                self._scratch = tempfile.TemporaryDirectory(prefix="curation-shard-")
                self._tar_path = Path(self._scratch.name) / f"{shard}.tar"
            self._file = _Crc32Writer(open(self._tar_path, "wb"))  # noqa: SIM115 (closed by commit or _cleanup)
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        except OSError as exc:
            self._cleanup()
            raise _write_error(stage.path(f"{shard}.tar"), exc) from exc

    def add(self, key: str, members: dict[str, bytes]) -> dict[str, tuple[int, int]]:
        """Add one sample's members ({"jpg": ..., "json": ...}); a key may be written once.

        Returns {ext: (offset of the member's data in the tar, its size)}, so an index can point at one member.
        """
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in shard {self.shard}")
        if "." in key or "/" in key:
            raise ValueError(f"unsafe key {key!r}: keys may not contain dots or slashes")
        self._keys.add(key)
        where: dict[str, tuple[int, int]] = {}
        tar = self._tar
        try:
            for ext in sorted(members):
                data = members[ext]
                info = _tarinfo(f"{key}.{ext}", len(data))
                # The data follows the member's header blocks (more than one for a long name), as `addfile`
                # writes them: the same `tobuf` bytes.
                where[ext] = (tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors)), len(data))
                tar.addfile(info, io.BytesIO(data))
        except OSError as exc:
            raise _write_error(self.stage.path(f"{self.shard}.tar"), exc) from exc
        return where

    def commit(self, index: pa.Table, done: DoneMarker) -> DoneMarker:
        """Publish the shard: tar, then parquet index, then the done marker (last, so it marks completeness).

        The marker records both files' sizes and CRC-32s: the tar's summed as it was written, the index's from its
        bytes in memory, so neither is read again.
        """
        index_bytes = parquet_bytes(index)
        done.shard, done.rows, done.seconds = self.shard, index.num_rows, round(time.time() - self._started, 3)
        done.extra["members"] = len(self._keys)
        names = [f"{self.shard}.tar", f"{self.shard}.parquet", f"{self.shard}.done.json"]
        published: list[str] = []
        current = names[0]
        try:
            self._tar.close()  # writes the end-of-archive blocks, through the checksum
            self._file.close()
            done.files = {names[0]: self._file.record(), names[1]: file_record(index_bytes)}
            # Redoing a shard (--force): its old marker must not vouch for the new tar while it is being replaced.
            self._remove(names[2])
            self._publish_file(self._tar_path, names[0])
            published.append(names[0])
            current = names[1]
            self._publish_bytes(index_bytes, names[1])
            published.append(names[1])
            current = names[2]
            self._publish_bytes(json.dumps(done.to_json(), indent=1, sort_keys=True).encode(), names[2])
            self._sync_folder()
        except OSError as exc:
            for name in reversed(published):  # leave no half shard behind: a tar without its index is noise
                with contextlib.suppress(OSError):  # the original error is the one to report
                    self._remove(name)
            raise _write_error(self.stage.path(current), exc) from exc
        finally:
            self._cleanup()
        return done

    def abort(self) -> None:
        self._cleanup()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _cleanup(self) -> None:
        """Close and remove this writer's temporaries; safe to call twice (commit, then the `with` block)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, AttributeError, tarfile.TarError):
            self._tar.close()
        with contextlib.suppress(OSError, AttributeError):
            self._file.close()
        if self._scratch is not None:
            self._scratch.cleanup()
        elif hasattr(self, "_tar_path"):
            with contextlib.suppress(OSError):  # absent (renamed into place), or a read-only folder never held it
                os.remove(self._tar_path)

    def _remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.stage.fs.rm(self.stage.path(name))

    def _publish_file(self, local: Path, name: str) -> None:
        stage = self.stage
        if stage.is_local:
            with open(local, "rb+") as f:  # durable before it is renamed into view
                os.fsync(f.fileno())
            os.replace(local, stage.path(name))
        else:
            stage.fs.put_file(str(local), stage.path(name))

    def _publish_bytes(self, data: bytes, name: str) -> None:
        stage = self.stage
        if not stage.is_local:
            stage.fs.pipe_file(stage.path(name), data)  # one PUT: the object appears whole or not at all
            return
        tmp = stage.path(_tmp_name(name))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, stage.path(name))
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise

    def _sync_folder(self) -> None:
        # The renames themselves live in the folder's entry list: sync it so a power cut keeps the done marker.
        if self.stage.is_local:
            fd = os.open(self.stage.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class _Crc32Writer:
    """A file being written, summing the CRC-32 and size of what goes through it (`tarfile` writes only through
    `write`, and asks `tell` once)."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f, self.crc, self.size = f, 0, 0

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()

    def record(self) -> FileRecord:
        return {"size": self.size, "crc32": self.crc}


def _tmp_name(name: str) -> str:
    return f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}"


def _write_error(path: str, exc: OSError) -> ShardWriteError:
    error = ShardWriteError(f"cannot write {path}: {exc.strerror or exc or type(exc).__name__}")
    error.errno = exc.errno  # callers may still test for ENOSPC, EROFS, ...
    return error


def write_json_atomic(url: str, payload: dict[str, Any]) -> None:
    """Small JSON files beside the shards (run_config.json, reports), written atomically too."""
    write_bytes_atomic(url, json.dumps(payload, indent=1, sort_keys=True, default=str).encode())


def write_parquet_atomic(url: str, table: pa.Table, row_group_size: int | None = None) -> None:
    """Listing files and other small indexes: a reader sees the whole file or none."""
    write_bytes_atomic(url, parquet_bytes(table, row_group_size))


def write_bytes_atomic(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        folder, name = os.path.split(path)
        os.makedirs(folder or ".", exist_ok=True)
        # Named like the shard temporaries, so `remove_stale_temporaries` clears what a killed worker leaves.
        tmp = os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # one PUT: the object appears whole or not at all
