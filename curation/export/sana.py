"""Export to the webdataset layout Sana's `SanaWebDataset` / `SanaWebDatasetMS` read (github:NVlabs/Sana,
`diffusion/data/datasets/sana_data*.py`), one tar per `images/` shard:

    DIR/wids-meta.json                  {"wids_version": 1, "shardlist": [{"url", "nsamples", "filesize"}]}
    DIR/<shard>.tar                     <key>.jpg|png (the bytes), <key>.json, [<key>.npy]: adjacent members
    DIR/<shard>_<field>.json            {key: {field: text}} for every other caption field, every exported key
    DIR/<shard>_<field>_clip_score.json {key: {field: score}} per other field, <shard>_prompt_clip_score.json {key:
                                        {"prompt": score}},
                                        when the quality stage's `clip_score_<set>` columns exist
    DIR/.curation/export-sana/          the done markers (the runner's; Sana reads only wids-meta.json)

What Sana's reader needs, and would silently get wrong otherwise (checked against its code):
- it opens `.jpg` or `.png` members only and applies no EXIF orientation: a JPEG or PNG that needs no rotation
  passes unchanged; any other format, and an EXIF-rotated photo, is written upright as PNG (`converted`), the one
  exception to "bytes pass through unchanged";
- `<key>.json` has `prompt` (the `--prompt-field` caption), `height`/`width` of the pixels written (its bucket
  sampler and `get_closest_ratio` read them), `key`, and the other fields' captions;
- an external caption file `<shard><suffix>.json` is found by replacing `.tar` in the shard's path: keys map to
  {field: text}, field names equal to the suffix without its `_`; a key without a caption in that field takes the
  prompt's text (counted `<field>_fallback`), so the file covers every key and Sana never trains on an empty text;
- clip-score files hold {key: {field: score}} with the caption fields' names; `_prompt_clip_score.json` (the bucket
  sampler's `get_data_info`) covers every key;
- `.npy` latents (with `--vae-tag TAG`): a DC-AE sidecar `vae{R}[ms]-TAG`, (32, h/32, w/32) at the bucket, times the
  DC-AE's `scaling_factor`, as Sana's training code feeds `batch[0]` to the model unscaled (`load_vae_feat`);
- keys hold no dots (webdataset splits member names at the first dot): the layout guarantees it.
Samples failed or skipped upstream, or without a prompt, are left out and counted.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curation.buckets import BASES
from curation.errors import ConfigError, SetupError
from curation.export.passes import ExportDone, ExportInputs, write_file
from curation.features.npy import npy_bytes, read_npy
from curation.features.stage import vae_sidecar
from curation.imaging import ImageDecodeError, decode_image
from curation.layout import DEFAULT_SET, ORIGINAL, Layout, check_set_name
from curation.records import OK
from curation.shards import DoneMarker, StageDir, config_hash, lineage, write_bytes_atomic
from curation.stage import (
    InputView,
    Needs,
    Pass,
    Resources,
    RowsDone,
    RunContext,
    Stage,
    check_include,
    include_field,
    needs_images,
    no_progress,
)

if TYPE_CHECKING:
    from curation.runner import StageRun

LABEL = "export-sana"
META = "wids-meta.json"
PROMPT = "prompt"  # Sana's `default_prompt`
PASSTHROUGH = {"JPEG": "jpg", "PNG": "png"}  # the formats Sana's reader opens, by member extension
QUALITY = "quality"  # the quality stage's folder: `clip_score_<set>` columns per images shard


@dataclass(frozen=True)
class SanaConfig:
    to: str = field(metadata={"help": "the folder to write (Sana's data_dir)"})
    prompt_field: str = field(
        default=DEFAULT_SET, metadata={"help": "the caption set written as `prompt` (or original)"}
    )
    multiscale: bool = field(default=False, metadata={"help": "with --vae-tag: the bucketed (multi-scale) latents"})
    vae_tag: str | None = field(
        default=None, metadata={"help": "add <key>.npy latents from the DC-AE sidecars vae{R}[ms]-TAG"}
    )
    resolution: int | None = field(
        default=None, metadata={"help": "with --vae-tag: the latents' bucket base (default: the only one there is)"}
    )
    include: tuple[str, ...] = include_field("export")  # not in semantics: in the lineage

    def __post_init__(self) -> None:
        object.__setattr__(self, "to", os.path.abspath(os.fspath(self.to)))
        object.__setattr__(self, "include", check_include(self.include))
        if self.prompt_field not in (ORIGINAL, DEFAULT_SET):
            check_set_name(self.prompt_field)
        if self.vae_tag is not None and not self.vae_tag.isalnum():
            raise ConfigError(f"vae_tag must be letters and digits, got {self.vae_tag!r}")
        if self.resolution is not None and self.resolution not in BASES:
            raise ConfigError(f"resolution must be among {BASES}, got {self.resolution}")


@dataclass(frozen=True)
class SanaPlan:
    """What every shard's task needs: the caption fields, the latents' sidecar, where to write."""

    layout: Layout
    config: SanaConfig
    fields: tuple[str, ...]  # prompt field first, then the other caption fields (sets, original)
    vae: str | None  # the latents' sidecar name
    view: InputView  # `images/` as this stage reads it (`Stage.input_view`)

    @property
    def done_dir(self) -> ExportDone:
        return ExportDone.at(self.config.to, LABEL, ("{shard}.tar", "{shard}_*.json"))

    @property
    def semantics(self) -> dict[str, Any]:
        return {"format": "sana", "fields": list(self.fields), "vae": self.vae}

    def sets(self) -> list[StageDir]:
        return [self.layout.captions(f) for f in self.fields if f != ORIGINAL]

    def inputs(self) -> ExportInputs:
        vae = [self.layout.sidecar(self.vae)] if self.vae else []
        return ExportInputs(self.view, [*self.sets(), *vae])


def plan_export(layout: Layout, config: SanaConfig, view: InputView) -> tuple[SanaPlan, list[str]]:
    """The plan and its shards; SetupError (one line) for what cannot work."""
    shards = layout.images.done_shards()
    if not shards:
        raise SetupError(layout.missing_images())
    sets = layout.caption_sets()
    prompt = config.prompt_field
    if prompt != ORIGINAL and prompt not in sets:
        have = ", ".join(sets) if sets else "none"
        raise SetupError(
            f"no caption set {prompt!r} in {layout.output} (sets: {have}): pass --prompt-field with one of them or "
            f"original, or run curation caption --name {prompt} first"
        )
    fields = (prompt, *[s for s in sets if s != prompt], *([ORIGINAL] if prompt != ORIGINAL else []))
    vae = _latents(layout, config) if config.vae_tag else None
    # A shard is exported once its prompt set and its latents are done (other sets may cover fewer shards).
    needed = ([layout.captions(prompt)] if prompt != ORIGINAL else []) + ([layout.sidecar(vae)] if vae else [])
    ready = set(shards).intersection(*(d.done_shards() for d in needed))
    return SanaPlan(layout, config, fields, vae, view), [s for s in shards if s in ready]


def _latents(layout: Layout, config: SanaConfig) -> str:
    """The DC-AE sidecar to read: `vae{R}[ms]-TAG` at the one resolution there is, or the one asked for."""
    bases = [config.resolution] if config.resolution else list(BASES)
    found = [r for r in bases if layout.sidecar(vae_sidecar(r, config.multiscale, config.vae_tag)).done_shards()]
    run = f"curation features --vae <DC-AE> --vae-tag {config.vae_tag}{' --multiscale' if config.multiscale else ''}"
    if not found:
        raise SetupError(f"no {vae_sidecar(bases[0], config.multiscale, config.vae_tag)} latents: run {run} first")
    if len(found) > 1:
        raise SetupError(f"latents at several resolutions ({', '.join(map(str, found))}): pass --resolution")
    name = vae_sidecar(found[0], config.multiscale, config.vae_tag)
    sidecar = layout.sidecar(name)
    marker = sidecar.read_done(sidecar.done_shards()[0])
    if marker.extra.get("latent") != "dcae":
        raise SetupError(f"features/{name} holds a KL VAE's posterior moments, not DC-AE latents: run {run}")
    return name


class SanaStage(Stage):
    name = "export-sana"
    help = "images/, caption sets and DC-AE latents -> Sana's webdataset shards (wids-meta.json)"
    config_type = SanaConfig

    def __init__(self, layout: Layout, config: SanaConfig) -> None:
        super().__init__(layout, config)
        self.result: dict[str, int] = {}  # the counts, for callers
        self.shards: list[str] = []  # planned by `check`, with `plan`

    def needs(self) -> list[Needs]:
        return [needs_images(self.layout)]

    def check(self) -> None:
        super().check()
        self.plan, self.shards = plan_export(self.layout, self.config, self.input_view(self.layout.images))
        if not self.shards:
            raise SetupError(f"no shard of {self.layout.output} has every input of the export done")

    def passes(self, ctx: RunContext) -> Iterator[Pass]:
        Path(self.config.to).mkdir(parents=True, exist_ok=True)
        yield Pass(
            label=LABEL,
            folder=self.plan.done_dir,
            make_worker=functools.partial(SanaWorker, self.plan),
            tasks=[(s, None) for s in self.shards],
            semantics=self.plan.semantics,
            resources=Resources(stateless=True),
            upstream=self.plan.inputs(),
        )

    def finish(self, summaries: list[Any]) -> list[str]:
        """`wids-meta.json` last, from the shards' done markers: `nsamples` exact, URLs relative to it."""
        done = self.plan.done_dir
        markers = done.read_dones(self.shards)
        shardlist = [
            {"url": f"{s}.tar", "nsamples": m.extra["nsamples"], "filesize": m.extra["filesize"]}
            for s, m in sorted(markers.items())
            if m.extra["nsamples"]
        ]
        meta = {"wids_version": 1, "shardlist": shardlist}
        write_bytes_atomic(os.path.join(self.config.to, META), json.dumps(meta, indent=1).encode())
        self.result = dict(sorted(summaries[0].counts.get("by_export", {}).items()))
        self.result["shards_listed"] = len(shardlist)  # in wids-meta.json: those with samples
        lines = ["[export-sana] " + ", ".join(f"{k}={v}" for k, v in self.result.items())]
        if not _clip_scores(self.layout, self.shards[0], self.plan.fields):
            lines.append(f"[export-sana] no clip scores ({QUALITY}/ has no clip_score_<set> columns): files left out")
        return lines

    def outputs(self) -> list[str]:
        return [f"Sana data_dir: {self.config.to} ({META})"]


def _clip_scores(layout: Layout, shard: str, fields: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{field: {key: score}} from the quality stage's `clip_score_<field>` columns, where that stage ran."""
    quality = layout.stage_folder(QUALITY)
    if not quality.has_done(shard):
        return {}
    table = quality.read_index(shard)
    found = [f for f in fields if f"clip_score_{f}" in table.column_names]
    if not found:
        return {}
    keys = table.column("key").to_pylist()
    out = {}
    for f in found:
        scores = table.column(f"clip_score_{f}").to_pylist()
        out[f] = {k: float(v) for k, v in zip(keys, scores, strict=True) if v is not None}
    return out


class SanaWorker:
    """Writes one shard: its tar, its external caption and clip-score files, then its done marker."""

    def __init__(self, plan: SanaPlan) -> None:
        self.plan = plan

    def setup(self) -> None:
        pass

    def process(self, shard: str, payload: None = None, rows_done: RowsDone = no_progress) -> DoneMarker:
        started = time.time()
        plan, to = self.plan, Path(self.plan.config.to)
        layout = plan.layout
        removed = plan.view.removed(shard)
        rows = {r["key"]: r for r in layout.images.read_index(shard).to_pylist()}
        texts = _texts(layout, shard, plan.fields, rows)
        counts: dict[str, int] = {"samples": 0, "converted": 0, "failed": 0, "no_prompt": 0}
        keep: list[str] = []
        for key, r in rows.items():
            if key in removed:
                reason = f"skipped_{removed[key][0]}"
                counts[reason] = counts.get(reason, 0) + 1
            elif r["status"] != OK:
                counts["failed"] += 1
            elif not texts[plan.fields[0]].get(key):
                counts["no_prompt"] += 1
            else:
                keep.append(key)
        latents = self._latents(shard, keep, counts)
        keep = [k for k in keep if latents is None or k in latents]
        tmp, written = to / f".tmp-{shard}.tar", []
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for key, members in layout.images.iter_samples(shard):
                if key not in keep:
                    continue
                try:
                    ext, data, (height, width), converted = _image(members[rows[key]["ext"]])
                except (ImageDecodeError, KeyError):  # unreadable pixels, or no image member: a failed sample
                    counts["failed"] += 1
                    continue
                counts["converted"] += converted
                record = {PROMPT: texts[plan.fields[0]][key], "height": height, "width": width, "key": key}
                record |= {f: texts[f].get(key) or record[PROMPT] for f in plan.fields[1:]}
                out = {ext: data, "json": json.dumps(record, ensure_ascii=False).encode()}
                if latents is not None:
                    out["npy"] = latents[key]
                for name, blob in out.items():  # a sample's members adjacent, image first
                    info = tarfile.TarInfo(f"{key}.{name}")
                    info.size, info.mtime, info.mode = len(blob), 0, 0o644
                    tar.addfile(info, io.BytesIO(blob))
                written.append(key)
        counts["samples"] = len(written)
        prompts = texts[plan.fields[0]]
        for f in plan.fields[1:]:  # every other field, covering every key (the prompt's text where it has none)
            counts[f"{f}_fallback"] = sum(1 for k in written if not texts[f].get(k))
            captions = {k: {f: texts[f].get(k) or prompts[k]} for k in written}
            write_file(to / f"{shard}_{f}.json", json.dumps(captions, ensure_ascii=False).encode())
        scores = _clip_scores(layout, shard, plan.fields)
        for f, by_key in scores.items():
            if f == plan.fields[0]:  # the prompt's scores go under `prompt`, the name Sana reads it by
                continue
            clip = {k: {f: by_key[k]} for k in written if k in by_key}
            write_file(to / f"{shard}_{f}_clip_score.json", json.dumps(clip).encode())
        if scores:  # the bucket sampler reads the prompt's score of every key
            prompt = scores.get(plan.fields[0], {})
            clip = {k: {PROMPT: prompt.get(k, 0.0)} for k in written}
            write_file(to / f"{shard}_{PROMPT}_clip_score.json", json.dumps(clip).encode())
        os.replace(tmp, to / f"{shard}.tar")
        done = DoneMarker(
            shard,
            stage=LABEL,
            rows=len(written),
            **lineage(config_hash(plan.semantics), plan.inputs().lineages([shard])[shard]),
            counts={"by_export": counts},
            extra={"nsamples": len(written), "filesize": (to / f"{shard}.tar").stat().st_size},
        )
        done.seconds = round(time.time() - started, 3)
        return plan.done_dir.write_done(done)  # last

    def _latents(self, shard: str, keep: list[str], counts: dict[str, int]) -> dict[str, bytes] | None:
        """{key: `.npy` bytes} of the shard's DC-AE latents, scaled as Sana's trainer reads them; None without."""
        if self.plan.vae is None:
            return None
        sidecar = self.plan.layout.sidecar(self.plan.vae)
        scale = float(sidecar.read_done(shard).extra["scaling_factor"])
        wanted = set(keep)
        out = {}
        for key, members in sidecar.iter_samples(shard):
            if key in wanted:
                out[key] = npy_bytes((read_npy(members["vae.npy"]) * scale).astype(np.float32))
        counts["no_latent"] = len(wanted - out.keys())
        return out


def _texts(layout: Layout, shard: str, fields: tuple[str, ...], rows: dict[str, dict]) -> dict[str, dict[str, str]]:
    """{field: {key: text}} of the shard: each set's ok captions, and the originals from the ingest records."""
    out: dict[str, dict[str, str]] = {}
    for f in fields:
        if f == ORIGINAL:
            out[f] = {k: r["original_caption"] for k, r in rows.items() if (r["original_caption"] or "").strip()}
            continue
        captions = layout.captions(f)
        index = captions.read_index(shard).to_pylist() if captions.has_done(shard) else []
        out[f] = {r["key"]: r["caption"] for r in index if r["status"] == OK and (r["caption"] or "").strip()}
    return out


def _image(data: bytes) -> tuple[str, bytes, tuple[int, int], int]:
    """(member extension, bytes, (height, width) of what is written, 1 if converted): JPEG and PNG pass unchanged
    unless EXIF-rotated; anything else is decoded upright and written as PNG."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format in PASSTHROUGH and im.getexif().get(0x0112, 1) == 1:
                return PASSTHROUGH[im.format], data, (im.height, im.width), 0
    except Exception:  # hostile headers: decode_image below names the reason
        pass
    image = decode_image(data)  # EXIF orientation applied, RGB; ImageDecodeError when it cannot
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "png", buf.getvalue(), (image.height, image.width), 1


def run_export_sana(output: str, config: SanaConfig, **kw: Any) -> StageRun:
    """`curation export-sana` from Python: see `curation.runner.run` for the keywords; `.result` is the counts."""
    from curation.runner import run

    return run(SanaStage(Layout(output), config), **kw)
