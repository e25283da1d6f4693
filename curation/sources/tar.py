"""Tar archives read header by header, accounting for every byte: what `tarfile` stops at is walked past.

`tarfile` ends an archive at its first zero block or bad header, so a damaged header, a second archive appended
with `cat a.tar b.tar`, or a member cut short silently loses every member behind it. `walk_tar` instead:
- on a block that is no valid header (checksum wrong, garbage), scans forward 512 bytes at a time for the next
  valid header and goes on, noting the damaged span (zero blocks are tar's own end-of-archive padding, not damage);
- reads past end-of-archive zero blocks, so concatenated archives are read to their real end;
- reports a member whose data is cut short (`truncated_member`) or larger than the cap (`too_large`) instead of
  listing it, and counts links, devices and FIFOs as skipped by kind;
- reads a compressed stream to its very end, so the gzip CRC is checked: a mismatch (or a cut or corrupt stream)
  fails every member (`corrupt_archive`), since none of their bytes can be trusted.

It understands ustar, GNU (long names, base-256 sizes) and pax (`path`, `size`) headers: what img2dataset,
webdataset, SA-1B and GNU/BSD tar write. A local plain tar is walked seeking over the data (a 10 GB SA-1B tar costs
its ~22k headers); a stream (compressed, or on object storage) is read once, front to back.
"""

from __future__ import annotations

import gzip
import zlib
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from typing import BinaryIO

BLOCK = 512
_ZERO = bytes(BLOCK)
_SCAN_CHUNK = 128 * BLOCK  # bytes read at a time while looking for the next valid header
_REGULAR = (b"0", b"\0", b"7")
_SKIPPED_KINDS = {b"1": "link", b"2": "link", b"3": "device", b"4": "device", b"6": "fifo"}
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # tarfile reads no data after these, whatever their size says
MAX_NOTES = 5  # notes kept per archive: a badly damaged archive must not grow its listing without bound


@dataclass
class TarWalk:
    """What one pass over an archive found."""

    files: list[tuple[str, int, int]] = field(default_factory=list)  # (name, data offset, size), archive order
    mtimes: dict[str, int] = field(default_factory=dict)  # name -> the header's mtime (with its size: its identity)
    damaged: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (reason, message): not readable
    skipped: Counter = field(default_factory=Counter)  # entries that are no sample, by reason
    notes: list[str] = field(default_factory=list)  # what was wrong, one line each (at most MAX_NOTES)
    data: dict[str, bytes] = field(default_factory=dict)  # the wanted members' bytes

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)


class _Stream:
    """Sequential reads with push-back; `skip` seeks where it can (`end` known) and reads through otherwise."""

    def __init__(self, f: BinaryIO, end: int | None) -> None:
        self.f, self.end, self.pos, self._back = f, end, 0, b""

    def read(self, n: int) -> bytes:
        data, self._back = self._back[:n], self._back[n:]
        if len(data) < n:
            data += self.f.read(n - len(data))
        self.pos += len(data)
        return data

    def unread(self, data: bytes) -> None:
        self._back = data + self._back
        self.pos -= len(data)

    def skip(self, n: int) -> int:
        """Skip up to n bytes; returns how many there were."""
        taken = min(n, len(self._back))
        self._back = self._back[taken:]
        self.pos += taken
        n -= taken
        if not n:
            return taken
        if self.end is not None:  # nothing pushed back now: the file is at self.pos
            step = max(0, min(n, self.end - self.pos))
            self.pos += step
            self.f.seek(self.pos)
            return taken + step
        while n:
            data = self.f.read(min(n, 1 << 20))
            if not data:
                break
            n -= len(data)
            self.pos += len(data)
            taken += len(data)
        return taken


def is_header(block: bytes) -> bool:
    """A 512-byte block whose checksum is right (tar accepts the unsigned or the signed byte sum)."""
    if len(block) < BLOCK or block == _ZERO:
        return False
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 256 + sum(block[156:])
    if stored == unsigned:
        return True
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    return stored == signed


def _size(block: bytes) -> int:
    if block[124] & 0x80:  # GNU base-256, for members of 8 GiB and more
        if block[124] == 0xFF:
            raise ValueError("negative size")
        return int.from_bytes(bytes([block[124] & 0x7F]) + block[125:136], "big")
    return int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)


def _mtime(block: bytes, pax: str | None) -> int:
    """The member's modification time (pax's own record first); 0 where the header's field is unreadable."""
    try:
        return int(float(pax)) if pax else int(block[136:148].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:  # a base-256 mtime or a damaged field: the size alone then identifies the member
        return 0


def _name(raw: bytes) -> str:
    # Names are bytes; undecodable ones keep their bytes visible as escapes (storable text, never a crash).
    return raw.decode("utf-8", "backslashreplace")


def _pax(data: bytes) -> dict[str, str]:
    """A pax extended header's records (`<len> key=value\\n`); malformed records end the parse."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        record = data[space + 1 : pos + length - 1]
        if length <= 0 or b"=" not in record:
            break
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "backslashreplace")] = _name(value)
        pos += length
    return out


def walk_tar(
    f: BinaryIO, url: str, *, end: int | None, compressed: bool, max_size: int, wanted: Container[str] = ()
) -> TarWalk:
    """Every entry of the archive open in `f` (decompressed already when `compressed`); `end`: its size when
    `f` may be seeked over the data, None to read it through. The members named in `wanted` are read into `data`."""
    walk = TarWalk()
    stream = _Stream(f, end)
    try:
        _walk(stream, url, walk, max_size, wanted)
        if compressed:
            while f.read(1 << 20):  # to the end: the gzip trailer's CRC and length are checked only there
                pass
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        if not compressed:
            raise
        why = f"{url} is a corrupt compressed archive ({type(exc).__name__}: {exc}); none of its bytes are trusted"
        walk.note(why)
        walk.data.clear()
        for name, _, _ in walk.files:
            walk.damaged[name] = ("corrupt_archive", why)
        if not walk.files:
            walk.skipped["damaged_archive"] += 1
        return walk
    if not walk.files:  # nothing usable: one count for the archive, beside the notes that say why
        if walk.skipped.pop("damaged_span", 0):
            walk.skipped["damaged_archive"] += 1
        elif not walk.skipped:
            walk.skipped["empty_archive"] += 1
    return walk


def _walk(stream: _Stream, url: str, walk: TarWalk, max_size: int, wanted: Container[str]) -> None:
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        start = stream.pos
        header = stream.read(BLOCK)
        if not header:
            return
        if not is_header(header):
            if not _resync(stream, walk, url, header, start):
                return
            long_name, pax = None, {}  # what preceded the damage no longer describes the header found
            continue
        kind = header[156:157]
        try:
            size = int(pax["size"]) if "size" in pax else _size(header)
        except ValueError:
            walk.note(f"{url}: the header at byte {start} has an unreadable size; skipped")
            walk.skipped["damaged_span"] += 1
            continue
        if kind in (b"L", b"K", b"x", b"g"):  # a GNU long name/link, or pax records, for the next header
            data = stream.read(size)
            stream.skip(-size % BLOCK)
            if len(data) < size:
                walk.note(f"{url}: cut short inside the extended header at byte {start}")
                walk.skipped["damaged_span"] += 1
                return
            if kind == b"L":
                long_name = _name(data.split(b"\0", 1)[0])
            elif kind == b"x":
                pax = _pax(data)
            continue  # K (long link target) and g (global pax records) change no member we list
        name, pax_mtime = pax.get("path") or long_name, pax.get("mtime")
        if name is None:
            name = _name(header[:100].split(b"\0", 1)[0])
            if header[257:262] == b"ustar" and header[345] != 0:
                name = _name(header[345:500].split(b"\0", 1)[0]) + "/" + name
        long_name, pax = None, {}
        if kind in _NO_DATA:
            if kind in _SKIPPED_KINDS:
                walk.skipped[_SKIPPED_KINDS[kind]] += 1
            continue
        offset = stream.pos
        regular = kind in _REGULAR and not (kind == b"\0" and name.endswith("/"))  # not an old-style folder
        if regular:
            walk.files.append((name, offset, size))
            walk.mtimes[name] = _mtime(header, pax_mtime)
            if size > max_size:
                walk.damaged[name] = ("too_large", f"{name} in {url} is {size:,} bytes, over the {max_size:,} cap")
        elif kind not in _REGULAR:  # GNU sparse files, volume labels, ...: data we cannot read as one file
            walk.skipped["unsupported_member"] += 1
        read = regular and size <= max_size and name in wanted
        data = stream.read(size) if read else b""
        have = len(data) if read else stream.skip(size)
        stream.skip(-size % BLOCK)
        if have < size:
            if regular:
                walk.damaged[name] = ("truncated_member", f"{name} in {url} is cut short: {have:,} of {size:,} bytes")
            walk.note(f"{url}: ends inside the member {name} (at byte {stream.pos:,})")
            return
        if read:
            walk.data[name] = data


def _resync(stream: _Stream, walk: TarWalk, url: str, block: bytes, start: int) -> bool:
    """After a block that is no header: find the next valid header (True, pushed back) or the end (False).

    Zero blocks end an archive but another may follow (`cat a.tar b.tar`); any other bytes skipped are damage.
    """
    damaged = any(block)
    while True:
        if len(block) == BLOCK:
            chunk = stream.read(_SCAN_CHUNK)
        else:  # a cut block: nothing follows it
            chunk = b""
        for i in range(0, len(chunk) - BLOCK + 1, BLOCK):
            candidate = chunk[i : i + BLOCK]
            if is_header(candidate):
                stream.unread(chunk[i:])
                if damaged:
                    _damage(walk, url, start, stream.pos)
                return True
            damaged = damaged or candidate != _ZERO
        if len(chunk) < _SCAN_CHUNK:
            tail = chunk[len(chunk) - len(chunk) % BLOCK :] if len(block) == BLOCK else block
            damaged = damaged or any(tail)
            if damaged:
                _damage(walk, url, start, stream.pos)
            return False
        block = chunk[-BLOCK:]


def _damage(walk: TarWalk, url: str, start: int, stop: int) -> None:
    walk.skipped["damaged_span"] += 1
    walk.note(f"{url}: bytes {start:,}-{stop:,} are no tar header or member data; skipped to the next header")
