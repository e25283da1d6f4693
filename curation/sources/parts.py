"""How a source shard's sorted listing is cut into output shards ("parts"), named, and given a lineage.

`key-chunks/1` (the plan of every new output) cuts by the keys themselves, so an added or removed file moves at most
one cut and a rerun equals a clean run on the same input (the cuts are a pure function of the keys). A source shard of
at most shard_size samples is one part; a larger one is cut:
1. a key starts a new chunk when hash(key) % (shard_size // 2) == 0 (at least 2): ~shard_size/2 keys on average;
2. a chunk shorter than shard_size / 4 joins the chunk before it (no tiny shards; decided per chunk, so it does
   not cascade);
3. a chunk longer than shard_size is split evenly into the fewest parts of at most shard_size keys.
On 100k random keys at --shard-size 1000 (`bench/bench_parts.py`): parts of 307-985 keys (5th percentile to
max), mean 610; one added key redoes the ~1,050 keys of the chunk it lands in, not every later part.

A part is named `<unit>-<its first key>`, so a name is a function of the part's content and stays put when a
chunk before it changes (positional numbers would all shift). `source-shards/1` (outputs made before) cut by
position into `<unit>-000`, `<unit>-001`, ...; an output made that way is planned that way until --force.

A part's lineage hashes each of its keys with the identity of every file the key reads (`SourceItem.identity`): the
images shard records it, so a rerun redoes exactly the parts whose files changed.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

KEY_CHUNKS = "key-chunks/1"
POSITIONAL = "source-shards/1"
SCHEMES = (KEY_CHUNKS, POSITIONAL)
_MAX_NAME = 150  # a part name (plus `.done.json`) stays well inside a file name's 255 bytes


@dataclass(frozen=True, slots=True)
class Part:
    """One output shard: rows [start, stop) of its unit's listing, and what they were made from."""

    name: str
    listing: str
    start: int
    stop: int
    lineage: str


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def chunk_bounds(keys: Sequence[str], shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each part of the sorted `keys` under `key-chunks/1` (see the module docstring)."""
    if len(keys) <= shard_size:  # a source shard that fits is one part (an img2dataset tar of --shard-size)
        return [(0, len(keys))] if keys else []
    every = max(2, shard_size // 2)  # 2 at the smallest: some chunks of several keys at --shard-size 2 or 3
    starts = [0] + [i for i in range(1, len(keys)) if _hash(keys[i]) % every == 0]
    ends = [*starts[1:], len(keys)]
    chunks: list[list[int]] = []
    for a, b in zip(starts, ends, strict=True):
        if chunks and b - a < shard_size / 4:
            chunks[-1][1] = b
        else:
            chunks.append([a, b])
    out = []
    for a, b in chunks:
        pieces = -(-(b - a) // shard_size)
        cuts = [a + (b - a) * i // pieces for i in range(pieces + 1)]
        out += list(zip(cuts[:-1], cuts[1:], strict=True))
    return out


def positional_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    """`source-shards/1`: consecutive runs of shard_size rows."""
    return [(start, min(n, start + shard_size)) for start in range(0, n, shard_size)]


def part_name(unit_id: str, first_key: str) -> str:
    """`<unit>-<first key>`; a very long one keeps a prefix and a hash of the rest (`~` is in no key)."""
    name = f"{unit_id}-{first_key}"
    if len(name) <= _MAX_NAME:
        return name
    return f"{name[: _MAX_NAME - 17]}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def plan_parts(
    unit_id: str, listing: str, keys: Sequence[str], identities: Sequence[str], shard_size: int, scheme: str
) -> list[Part]:
    """The parts of one unit's listing (its keys sorted, with each key's `identity`), by `scheme`."""
    if scheme == KEY_CHUNKS:
        bounds = chunk_bounds(keys, shard_size)
        names = [part_name(unit_id, keys[a]) for a, _ in bounds]
    else:
        bounds = positional_bounds(len(keys), shard_size)
        width = max(3, len(str(len(bounds) - 1)))
        names = [f"{unit_id}-{p:0{width}d}" for p in range(len(bounds))]
    return [
        Part(name, listing, a, b, part_lineage(keys[a:b], identities[a:b]))
        for name, (a, b) in zip(names, bounds, strict=True)
    ]


def part_lineage(keys: Sequence[str], identities: Sequence[str]) -> str:
    """What a part was made from: its keys and the identity of each key's files, in key order."""
    digest = hashlib.sha256()
    for key, identity in zip(keys, identities, strict=True):
        digest.update(f"{key}\t{identity}\n".encode())
    return digest.hexdigest()[:16]


def listing_changes(
    old: tuple[Sequence[str], Sequence[str] | None], new: tuple[Sequence[str], Sequence[str]]
) -> Counter:
    """Samples added, changed and removed between two listings of a unit ((keys, identities) each; an older
    listing without identities tells added and removed keys only)."""
    before = dict(zip(old[0], old[1] if old[1] is not None else [None] * len(old[0]), strict=True))
    after = dict(zip(*new, strict=True))
    changes = Counter(
        added=sum(k not in before for k in after),
        removed=sum(k not in after for k in before),
        changed=sum(k in after and v is not None and after[k] != v for k, v in before.items()),
    )
    return +changes
