"""Near-duplicate pairs among 64-bit hashes without comparing every pair, and their connected components.

Multi-index hashing (Norouzi et al., 2012): the 64 bits are split into 3 bands of 22/21/21 bits. Two hashes at
Hamming distance <= t differ in at most t bits, so some band differs in at most r = t // 3 of them (pigeonhole:
three bands each differing in r + 1 or more would make the distance >= 3r + 3 > t). Each band is an index
(a counting sort of the band values); a query probes every value within r bit flips of its own band value
(254 probes at t = 8) and verifies each hit by the true 64-bit distance. No pair within t is missed.

Why 3 wide bands rather than t + 1 = 9 bands matched exactly: a 7-bit band has 128 values, so at a million
hashes every bucket holds ~8,000 unrelated ones and the candidate pairs grow with the square of the input
(~3.5e10 at 1M). A 21-bit band has 2M values: a probe finds ~N / 2M unrelated hashes, so the work stays close to
linear up to about ten million hashes per index (the bench measures 100k and 1M).

`BandIndex.pairs` answers one band for a slice of queries: the dedup stage runs it as Ray tasks, one per
(band, query range); `find_pairs` runs everything in one process (bench, tests).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

BAND_WIDTHS = (22, 21, 21)  # bits 63..42, 41..21, 20..0
_QUERY_CHUNK = 4096  # queries per vectorised step: bounds memory at ~chunk x probes x 8 bytes per array


def band_radius(threshold: int) -> int:
    """Bit flips to probe per band so that every pair within `threshold` meets in some band."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return threshold // len(BAND_WIDTHS)


def band_values(hashes: np.ndarray, band: int) -> np.ndarray:
    shift = sum(BAND_WIDTHS[band + 1 :])
    return ((hashes >> np.uint64(shift)) & np.uint64((1 << BAND_WIDTHS[band]) - 1)).astype(np.int64)


def flip_masks(width: int, radius: int) -> np.ndarray:
    """Every `width`-bit value with at most `radius` bits set, 0 first."""
    masks = [0]
    for r in range(1, radius + 1):
        masks.extend(sum(1 << b for b in bits) for bits in combinations(range(width), r))
    return np.array(masks, dtype=np.int64)


class BandIndex:
    """One band of all hashes, sorted by band value, with each value's slice found in one lookup."""

    def __init__(self, hashes: np.ndarray, band: int) -> None:
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self.band = band
        self.values = band_values(self.hashes, band)
        self.order = np.argsort(self.values, kind="stable")
        self.sorted_hashes = self.hashes[self.order]
        index_type = np.int32 if len(hashes) < 2**31 else np.int64
        counts = np.bincount(self.values, minlength=1 << BAND_WIDTHS[band])
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(index_type)

    def pairs(self, threshold: int, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, distance) with i < j for the pairs within `threshold` bits found by probing from `queries`
        (positions; default all). Over all queries, a pair is reported once per band it meets in: from the side
        of the smaller band value, or of the smaller position when the band values are equal.
        """
        masks = flip_masks(BAND_WIDTHS[self.band], band_radius(threshold))
        queries = np.arange(len(self.hashes)) if queries is None else np.asarray(queries, dtype=np.int64)
        # In band-value order, neighbouring queries probe neighbouring buckets: the lookups stay in cache.
        queries = queries[np.argsort(self.values[queries], kind="stable")]
        found_i, found_j, found_d = [], [], []
        for start in range(0, len(queries), _QUERY_CHUNK):
            i, j, d = self._probe(queries[start : start + _QUERY_CHUNK], masks, threshold)
            found_i.append(i)
            found_j.append(j)
            found_d.append(d)
        if not found_i:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty, empty.astype(np.int8)
        return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)

    def _probe(self, queries: np.ndarray, masks: np.ndarray, threshold: int):
        values = self.values[queries]
        probes = values[:, None] ^ masks[None, :]
        hits = self.starts[probes + 1] - self.starts[probes]
        # Two hashes whose band values differ are found from both sides: probe only upward (halves the work).
        # Equal band values (mask 0) are kept here and settled by position below.
        hits[probes < values[:, None]] = 0
        flat = np.flatnonzero(hits)
        counts = hits.ravel()[flat].astype(np.int64)
        # One entry per (query, hashed item in a probed bucket): bucket start + offset within the bucket.
        entry_rows = np.repeat(flat // len(masks), counts)
        bucket_starts = self.starts[probes.ravel()[flat]].astype(np.int64) - (np.cumsum(counts) - counts)
        positions = np.repeat(bucket_starts, counts) + np.arange(len(entry_rows))
        distance = np.bitwise_count(self.hashes[queries][entry_rows] ^ self.sorted_hashes[positions])
        close = np.flatnonzero(distance <= threshold)
        i = queries[entry_rows[close]]
        j = self.order[positions[close]]
        same_value = self.values[j] == self.values[i]
        keep = ~same_value | (i < j)
        lo, hi = np.minimum(i, j)[keep], np.maximum(i, j)[keep]
        return lo, hi, distance[close][keep].astype(np.int8)


def find_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of `hashes` within `threshold` bits, each once: the whole search in this process."""
    parts = [BandIndex(hashes, band).pairs(threshold) for band in range(len(BAND_WIDTHS))]
    i, j, d = (np.concatenate(cols) for cols in zip(*parts, strict=True))
    pair_ids, first = np.unique(i * len(hashes) + j, return_index=True)
    return pair_ids // len(hashes), pair_ids % len(hashes), d[first]


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the graph with edges (a[k], b[k]): (nodes, label of each node).

    A node's label is the smallest node of its component. Memory and time follow the edges, i.e. the duplicates,
    not the number of hashes searched: min-label propagation with pointer jumping, vectorised.
    """
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ea, eb = inverse[: len(a)], inverse[len(a) :]
    labels = np.arange(len(nodes))
    while True:
        smaller = np.minimum(labels[ea], labels[eb])
        updated = labels.copy()
        np.minimum.at(updated, ea, smaller)
        np.minimum.at(updated, eb, smaller)
        while True:  # pointer jumping: every node straight to its label's label
            jumped = updated[updated]
            if np.array_equal(jumped, updated):
                break
            updated = jumped
        if np.array_equal(updated, labels):
            return nodes, nodes[labels]
        labels = updated
