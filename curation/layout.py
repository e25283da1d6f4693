"""Where everything lives in an output folder: the one place that builds output paths.

    OUT/images/                 ingest: original bytes, sizes, aspect-ratio buckets
    OUT/listings/{scan,units,annotations}/   ingest's plan: the input listed per source shard
    OUT/dedup/                  dedup: keep flags;  dedup/hashes/, dedup/edges/ its passes; dedup/summary.json
    OUT/captions/               the caption set `default`;  OUT/captions-NAME/ another set (peers: text and records)
    OUT/stats/                  noun-count partials of captions/;  OUT/stats-NAME/ of captions-NAME/;
                                OUT/stats-original/ of the originals (images/' records) and the buckets
    OUT/features/<sidecar>/     t5, t5-<field>-<L>, vae512, vae512ms, vae512-<tag> ...
    OUT/clip/<tag>/             quality: CLIP image embeddings (npy) per images shard, <tag> the model made safe
    OUT/quality/                quality: scores per images shard; quality/flags-images/, quality/flags-texts/ its
                                keep flags (aesthetic and NSFW thresholds; clip-score thresholds)
    OUT/select/                 select: keep flags of the top PCT% by aesthetic score; select/summary.json
    OUT/report/                 index.html, table1.md, duplicates.html ...
    OUT/logs/<pass>/<shard>.json  one JSON line per shard run (see `curation.runner.logs`)
    OUT/run_config.json         the resolved config of each stage's latest run
    OUT/.curation.lock          one run per output at a time

Every folder of shards holds `<shard>.tar`, `<shard>.parquet` and `<shard>.done.json` (see `curation.shards`).
A user-chosen name (a caption set, a VAE tag) only ever fills the NAME part of `captions-NAME`, `stats-NAME` or a
sidecar name, and the names above are reserved, so no choice can land on another stage's folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from curation.errors import ConfigError
from curation.shards import StageDir

DEFAULT_SET = "default"  # the caption set in `captions/`
ORIGINAL = "original"  # the samples' own captions (alt-text, prompts): a field wherever a set name is taken
_NAME = re.compile(r"[a-z0-9_]+")
# Folder names of the layout, and the field names that a set name is read as (`--field caption`, Σ's index fields).
RESERVED = frozenset(
    {ORIGINAL, "caption", "captions", "images", "dedup", "stats", "report", "features", "listings", "logs",
     "hashes", "edges", "summary", "run_config", "t5", "vae", "prompt", "sharegpt4v", "select", "clip", "quality"}
)  # fmt: skip


def check_set_name(name: str) -> str:
    """The name, when it can name a caption set; ConfigError (one line) otherwise."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"caption set name {name!r} must match [a-z0-9_]+")
    if name in RESERVED:
        raise ConfigError(f"caption set name {name!r} is reserved (taken by the output layout or a field)")
    return name


@dataclass(frozen=True)
class Layout:
    """The folders and files of one output (a local folder or any fsspec URL)."""

    output: str

    @property
    def root(self) -> str:
        return self.output.rstrip("/")

    @property
    def name(self) -> str:
        """The output folder's own name (the dataset's default name in reports)."""
        return os.path.basename(self.root) or "dataset"

    def url(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    # -- stage folders ----------------------------------------------------------------------------------------
    @property
    def images(self) -> StageDir:
        return StageDir(self.url("images"), "ingest")

    def listings(self, part: str) -> str:
        """Ingest's plan: `scan`, `units` or `annotations`."""
        return self.url("listings", part)

    @property
    def dedup(self) -> StageDir:
        return StageDir(self.url("dedup"), "dedup")

    @property
    def dedup_hashes(self) -> StageDir:
        return StageDir(self.url("dedup", "hashes"), "dedup")

    @property
    def dedup_edges(self) -> StageDir:
        return StageDir(self.url("dedup", "edges"), "dedup")

    @property
    def dedup_summary(self) -> str:
        return self.url("dedup", "summary.json")

    @staticmethod
    def captions_folder(caption_set: str) -> str:
        """`captions` for the default set, `captions-NAME` for another."""
        return "captions" if check_set_name(caption_set) == DEFAULT_SET else f"captions-{caption_set}"

    def captions(self, caption_set: str = DEFAULT_SET) -> StageDir:
        folder = self.captions_folder(caption_set)
        return StageDir(self.url(folder), "caption" if folder == "captions" else f"caption --name {caption_set}")

    def caption_sets(self) -> list[str]:
        """The caption sets with at least one done shard, the default set first."""
        found = [DEFAULT_SET] if self.captions().done_shards() else []
        base = StageDir(self.root)
        if base.fs.exists(base.root):
            for path in sorted(base.fs.ls(base.root, detail=False)):
                folder = path.rstrip("/").rsplit("/", 1)[-1]
                name = folder.removeprefix("captions-")
                if folder.startswith("captions-") and _NAME.fullmatch(name) and name not in RESERVED:
                    if self.captions(name).done_shards():
                        found.append(name)
        return found

    def stats(self, caption_set: str = DEFAULT_SET) -> StageDir:
        """Noun-count partials of a caption set (an older output's default set's also count the originals)."""
        folder = "stats" if check_set_name(caption_set) == DEFAULT_SET else f"stats-{caption_set}"
        return StageDir(self.url(folder), "stats")

    @property
    def stats_original(self) -> StageDir:
        """Noun-count partials of the originals, from `images/`' records (`original` is no set name: no clash)."""
        return StageDir(self.url(f"stats-{ORIGINAL}"), "stats")

    def missing(self, what: str, command: str) -> str:
        """The one-line refusal of a stage whose input (`what`) is not there: `command` makes it."""
        return f"no {what} in {self.output}: run curation {command} first"

    def missing_images(self) -> str:
        """The one-line refusal of a stage that reads `images/` when ingest has written none."""
        return self.missing("images", "ingest")

    def missing_set(self, caption_set: str) -> str:
        """The one-line refusal of a stage asked to read a caption set that has no shards."""
        return f"no caption set {caption_set!r} in {self.output}: run curation caption --name {caption_set} first"

    @property
    def features(self) -> str:
        return self.url("features")

    def sidecar(self, name: str) -> StageDir:
        """One feature sidecar folder (`t5`, `vae512ms`, ...): names come from `curation.features`."""
        return StageDir(self.url("features", name), "features")

    def clip(self, tag: str) -> StageDir:
        """CLIP image embeddings of one model (`tag`: its id made safe, see `curation.quality.model`)."""
        if not tag or "/" in tag or tag.startswith("."):
            raise ValueError(f"not a CLIP tag: {tag!r}")
        return StageDir(self.url("clip", tag), "quality")

    @property
    def quality(self) -> StageDir:
        """The quality stage's scores, one parquet per images shard."""
        return self.stage_folder("quality")

    def quality_flags(self, kind: str) -> StageDir:
        """The quality stage's keep flags: `images` (aesthetic, NSFW) or `texts` (clip scores)."""
        if kind not in ("images", "texts"):
            raise KeyError(kind)
        return StageDir(self.url("quality", f"flags-{kind}"), "quality")

    def stage_folder(self, stage_name: str) -> StageDir:
        """The folder of a stage that keeps one folder named after itself (stage names contain a dash or are in
        RESERVED, so no caption set can take one)."""
        return StageDir(self.url(stage_name), stage_name)

    def shard_folder(self, rel: str) -> tuple[StageDir, StageDir | None]:
        """A folder of shards named by its path in the output (`images`, `captions-dense`, `features/t5`,
        `dedup/hashes`), and the folder whose shards of the same names hold the keys it was made from (None for
        `images/`, and for `dedup/edges`, whose tasks are not images shards)."""
        top, _, sub = rel.partition("/")
        if top == "features" and sub:
            return self.sidecar(sub), self.images
        if top == "dedup":
            folder = {"": self.dedup, "hashes": self.dedup_hashes, "edges": self.dedup_edges}[sub]
            return folder, None if sub == "edges" else self.images
        if top == "clip" and sub:
            return self.clip(sub), self.images
        if top == "quality" and sub.startswith("flags-"):
            return self.quality_flags(sub.removeprefix("flags-")), self.images
        if sub:
            raise KeyError(rel)
        if top == "images":
            return self.images, None
        if top == self.stats_original.url.rsplit("/", 1)[-1]:
            return self.stats_original, self.images
        for prefix, folder in (("captions", self.captions), ("stats", self.stats)):
            if top == prefix or top.startswith(f"{prefix}-"):
                name = top.removeprefix(prefix).removeprefix("-") or DEFAULT_SET
                return folder(name), self.images if prefix == "captions" else self.captions(name)
        return self.stage_folder(top), self.images  # a keep-flag stage (size-filter): one shard per images shard

    @property
    def select_summary(self) -> str:
        return self.url("select", "summary.json")

    def report(self, file: str = "") -> str:
        return self.url("report", file) if file else self.url("report")

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def logs(self, label: str) -> str:
        """Per-shard log records of one pass (`images`, `dedup/hashes`, `features`)."""
        return self.url("logs", *label.split("/"))

    @property
    def run_config(self) -> str:
        return self.url("run_config.json")

    @property
    def lock_file(self) -> str:
        return ".curation.lock"
