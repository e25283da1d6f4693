"""The T5 kind: text features of one caption field in one sidecar, `t5` or `t5-<field>-<L>`.

    OUT/features/t5/NNNNN.tar        <key>.t5.npy (L, D) float16|float32, zeros after the real tokens
                                     <key>.t5mask.npy (L,) uint8 0/1

Sidecar names: `t5` keeps every configuration it held before named caption sets (the default set's captions or the
originals, any length but 300); the T5 features of a named caption set, or at PixArt-Σ's 300 tokens, go to
`t5-<field>-<L>` (`t5-default-300`, `t5-original-300`, `t5-dense-120`), so α's and Σ's features coexist.
Every caption set is a peer: a set's text comes from its folder (`captions/` for `default` or `caption`,
`captions-<NAME>/`; same keys as `images/`), and its shard's lineage joins the sidecar's; the originals come from
`images/`' records.
The model is `t5.py`'s `T5Features`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from curation.errors import SetupError
from curation.features.npy import npy_bytes
from curation.features.sidecar import FeatureKind, ShardJob, row
from curation.features.t5 import T5Features, TextFeatureConfig
from curation.layout import DEFAULT_SET, ORIGINAL, Layout
from curation.records import OK, Sample
from curation.shards import StageDir

DEFAULT_T5 = "DeepFloyd/t5-v1_1-xxl"  # PixArt-alpha's text encoder (google/t5-v1_1-xxl is the same model)
T5_SIDECAR = "t5"
FIELDS = ("caption", "original")  # text fields named otherwise than by a set: `caption` is the set `default`
SIGMA_MAX_LENGTH = 300  # PixArt-Σ's T5 length (α: 120)
STORAGE_DTYPES = ("float16", "float32")
_T5_WINDOW_BATCHES = 4  # captions sorted by length within 4 batches: most of the gain, bounded memory

T5_INDEX = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_reason", pa.string()),
        ("error", pa.string()),
        ("tokens", pa.int64()),  # before truncation, EOS included: > max_length means truncated
        ("text", pa.string()),  # as given to the tokenizer's cleaning: the export's prompt
    ]
)


def t5_sidecar(field: str, max_length: int) -> str:
    """`t5` for the default set or the originals (any length but Σ's), else `t5-<field>-<L>` (see the module doc)."""
    if field in FIELDS and max_length != SIGMA_MAX_LENGTH:
        return T5_SIDECAR
    return f"t5-{DEFAULT_SET if field == 'caption' else field}-{max_length}"


class TextFeatures(FeatureKind):
    """T5 features of the config's `field`: the default set's captions, the originals, or a named caption set."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        c = config
        self.model = T5Features(
            TextFeatureConfig(
                c.t5,
                max_length=c.max_length,
                clean_caption=c.clean_caption,
                batch_size=c.t5_batch_size,
                device=c.device,
            )
        )

    @property
    def name(self) -> str:
        return t5_sidecar(self.config.field, self.config.max_length)

    def sidecars(self) -> dict[str, dict[str, Any]]:
        c = self.config
        semantics = {
            "t5": c.t5,
            "max_length": c.max_length,
            "dtype": c.dtype,
            "field": c.field,
            "clean_caption": c.clean_caption,
        }
        return {self.name: semantics}

    @property
    def set_name(self) -> str | None:
        """The caption set whose text is encoded (`caption` is the set `default`); None for the originals."""
        field = self.config.field
        return None if field == ORIGINAL else DEFAULT_SET if field == "caption" else field

    def text_set(self, layout: Layout) -> StageDir | None:
        """The caption set's folder; None for the originals (in `images/`' records)."""
        return None if self.set_name is None else layout.captions(self.set_name)

    def inputs(self, layout: Layout, sidecar: str) -> list[StageDir]:
        found = self.text_set(layout)
        return [found] if found is not None else []

    def check(self, layout: Layout, shards: list[str]) -> None:
        found = self.text_set(layout)
        if found is None:
            return
        have = found.done_shards()
        if not have:
            raise SetupError(layout.missing_set(self.set_name))
        if missing := sorted(set(shards) - set(have)):
            raise SetupError(
                f"caption set {self.set_name!r} lacks {len(missing)} shard(s) of images/ (e.g. {missing[0]}): "
                f"run `curation caption --name {self.set_name}` first"
            )

    def setup(self) -> None:
        self.model.setup()

    def write(self, job: ShardJob, sidecars: list[str]) -> None:
        (name,) = sidecars
        texts: dict[str, str] = {}
        rows = []
        for s, text in self._texts(job):
            if s.status == OK and (text is None or not text.strip()):
                s = dataclasses.replace(s)  # the failure is this sidecar's, not the captions row's
                s.fail("no_text", f"sample {s.key} has no {self.config.field} text")
            if s.status == OK:
                texts[s.key] = text
            rows.append(row(s, tokens=None, text=text))
        keys = list(texts)
        counts = dict(zip(keys, self.model.token_counts([texts[k] for k in keys]).tolist(), strict=True))
        for r in rows:
            r["tokens"] = counts.get(r["key"])
        dtype = np.dtype(self.config.dtype)
        window = _T5_WINDOW_BATCHES * self.config.t5_batch_size
        with job.writer(name) as writer:
            for start in range(0, len(keys), window):
                chunk = keys[start : start + window]
                features, mask = self.model.encode([texts[k] for k in chunk], dtype=dtype)
                for i, key in enumerate(chunk):
                    writer.add(
                        key,
                        {"t5.npy": npy_bytes(features[i]), "t5mask.npy": npy_bytes(mask[i].astype(np.uint8))},
                    )
            writer.commit(pa.Table.from_pylist(rows, schema=T5_INDEX), job.done(name, rows, dim=self.model.dim))

    def _texts(self, job: ShardJob) -> Iterator[tuple[Sample, str | None]]:
        """(sample, text to encode): its original, or its caption in the set (failed there: failed here too)."""
        text_set = self.text_set(job.layout)
        if text_set is None:
            yield from ((s, s.original_caption) for s in job.samples)
            return
        index = text_set.read_index(job.shard).select(["key", "status", "error_reason", "error", "caption"])
        named = {r["key"]: r for r in index.to_pylist()}
        for s in job.samples:
            found = named.get(s.key)
            if s.status == OK and found is None:
                s = dataclasses.replace(s)  # the failure is this sidecar's, not the captions row's
                s.fail("missing_caption", f"{s.key} is not in caption set {self.set_name}")
            elif s.status == OK and found["status"] != OK:
                s = dataclasses.replace(s)
                s.fail(found["error_reason"] or "failed", found["error"] or "")
            yield s, (found or {}).get("caption")
