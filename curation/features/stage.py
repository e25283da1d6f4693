"""Features stage: `captions/` shards -> T5 and VAE sidecar shards with the same shard names and keys.

    OUT/features/t5/NNNNN.tar        <key>.t5.npy (L, D) float16|float32, zeros after the real tokens
                                     <key>.t5mask.npy (L,) uint8 0/1
    OUT/features/vae{R}/NNNNN.tar    <key>.vae.npy (2C, h/8, w/8) float32 at R x R (single scale), and
    OUT/features/vae{R}ms/NNNNN.tar  at the sample's bucket size for base R (multi-scale); <key>.json sizes
    each with NNNNN.parquet (one row per sample, failed ones included) and NNNNN.done.json (last).

Sidecar names: `t5` keeps every configuration it held before named caption sets (the default set's captions or the
originals, any length but 300); the T5 features of a named caption set, or at PixArt-Σ's 300 tokens, go to
`t5-<field>-<L>` (`t5-default-300`, `t5-original-300`, `t5-dense-120`), so α's and Σ's features coexist. A VAE
other than α's may be given a tag, `vae512-sdxl`, `vae1024ms-sdxl`, so its latents sit beside the SD VAE's.
Images (and the shard list) always come from `captions/`; a named set's text from `captions-<NAME>/`, same keys.

Members are written in the captions shard's key order, so sidecars can also be read in lockstep with it.
Each sidecar has its own config hash: adding a resolution later computes only that sidecar, and a shard is
pending while any sidecar lacks a current done marker (`FeatureDirs` presents this to the runner).

Run: `curation features --output OUT --t5 DeepFloyd/t5-v1_1-xxl --vae stabilityai/sd-vae-ft-ema`
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from curation.buckets import BASES, bucket_size
from curation.caption.sets import DEFAULT_SET, check_set_name, set_dir
from curation.dedup.filter import DuplicateFilter
from curation.features.npy import npy_bytes
from curation.features.t5 import T5Features, TextFeatureConfig
from curation.features.vae import VaeFeatureConfig, VaeFeatures, cover_size, to_pixels
from curation.imaging import ImageDecodeError, decode_image, prefetch
from curation.records import FAILED, OK, SKIPPED, Sample, table_to_samples
from curation.shards import ShardWriter, StageDir, config_hash, lineage

INPUT = "captions"
DEFAULT_T5 = "DeepFloyd/t5-v1_1-xxl"  # PixArt-alpha's text encoder (google/t5-v1_1-xxl is the same model)
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # PixArt-alpha's VAE
T5_SIDECAR = "t5"
FIELDS = {"caption": "caption", "original": "original_caption"}  # config value -> Sample attribute
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
VAE_INDEX = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_reason", pa.string()),
        ("error", pa.string()),
        ("bucket", pa.string()),  # bucket key at base R (multi-scale) or null (single scale)
        ("height", pa.int64()),  # pixels the latent was computed at
        ("width", pa.int64()),
        ("orig_height", pa.int64()),  # the image as displayed: PixArt's data_info height/width
        ("orig_width", pa.int64()),
    ]
)


def vae_sidecar(resolution: int, multiscale: bool, tag: str | None = None) -> str:
    """Sidecar folder name: `vae512` (R x R centre crops) or `vae512ms` (bucket sizes at base 512), `-<tag>` after."""
    return f"vae{resolution}{'ms' if multiscale else ''}{f'-{tag}' if tag else ''}"


def t5_sidecar(field: str, max_length: int) -> str:
    """`t5` for the default set or the originals (any length but Σ's), else `t5-<field>-<L>` (see the module doc)."""
    if field in FIELDS and max_length != SIGMA_MAX_LENGTH:
        return T5_SIDECAR
    return f"t5-{DEFAULT_SET if field == 'caption' else field}-{max_length}"


@dataclass(frozen=True)
class FeaturesConfig:
    t5: str  # Hub id or folder, e.g. "DeepFloyd/t5-v1_1-xxl"
    vae: str  # Hub id or folder, e.g. "stabilityai/sd-vae-ft-ema"
    max_length: int = 120
    resolutions: tuple[int, ...] = (256, 512, 1024)
    multiscale: bool = False
    dtype: str = "float16"  # T5 feature storage; PixArt-alpha trained on float32 (the export converts)
    field: str = "caption"  # "caption" (generated) or "original" (alt-text, prompt)
    clean_caption: bool = True
    t5_batch_size: int = 64
    vae_batch_size: int = 16
    device: str = "auto"
    compile_vae: bool = False
    decode_threads: int = 4
    include_duplicates: bool = False  # encode the samples dedup removes too (not in semantics: in the lineage)
    vae_tag: str | None = None  # names the VAE sidecars `vae512-<tag>` (e.g. "sdxl"), beside the default VAE's

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.field == DEFAULT_SET:  # the default caption set is the historical "caption" field (same hash)
            object.__setattr__(self, "field", "caption")
        if self.field not in FIELDS:
            try:
                check_set_name(self.field)  # a named caption set
            except ValueError as exc:
                raise ValueError(f"field must be caption, original or a caption set's name: {exc}") from None
        if self.vae_tag is not None and not self.vae_tag.isalnum():
            raise ValueError(f"vae_tag must be letters and digits, got {self.vae_tag!r}")
        bad = [r for r in self.resolutions if r not in BASES]
        if bad or not self.resolutions:
            raise ValueError(f"resolutions must be among {BASES} (PixArt's bucket bases), got {self.resolutions}")
        if self.max_length < 1:
            raise ValueError("max_length must be at least 1")

    def t5_semantics(self) -> dict[str, Any]:
        return {
            "t5": self.t5,
            "max_length": self.max_length,
            "dtype": self.dtype,
            "field": self.field,
            "clean_caption": self.clean_caption,
        }

    def vae_semantics(self, resolution: int) -> dict[str, Any]:
        return {"vae": self.vae, "resolution": resolution, "multiscale": self.multiscale}

    def sidecars(self) -> dict[str, dict[str, Any]]:
        """{sidecar folder name: its semantics}; batch sizes and device do not change what is written."""
        out = {self.t5_sidecar: self.t5_semantics()}
        for r in sorted(set(self.resolutions)):
            out[vae_sidecar(r, self.multiscale, self.vae_tag)] = self.vae_semantics(r)
        return out

    @property
    def t5_sidecar(self) -> str:
        return t5_sidecar(self.field, self.max_length)

    @property
    def caption_set(self) -> str | None:
        """The named caption set whose text is encoded; None for the default set's captions or the originals."""
        return None if self.field in FIELDS else self.field

    def semantics(self) -> dict[str, Any]:
        return self.sidecars()


class FeatureDirs:
    """All sidecars of a run seen as one stage folder by the runner (the `StageDir` methods it calls).

    A shard counts as done once any sidecar is; its marker is `complete` when every sidecar is current (this config,
    made from the present captions shard), so the runner redoes incomplete shards and the stage writes only the
    missing or outdated sidecars. A sidecar made with another config is a changed shard: refused unless --force.
    """

    def __init__(self, output: str, config: FeaturesConfig) -> None:
        self.url = f"{output.rstrip('/')}/features"
        self.config = config
        self.input = StageDir(f"{output.rstrip('/')}/{INPUT}")
        self.duplicates = DuplicateFilter.for_stage(output, self.input, config.include_duplicates)
        self.upstream = self.duplicates or self.input  # the captions shards' lineage, dedup included
        # A named set's T5 sidecar is also made from that set's shard: its lineage joins both.
        self.text_set = StageDir(f"{output.rstrip('/')}/{set_dir(config.caption_set)}") if config.caption_set else None
        self.dirs = {name: StageDir(f"{self.url}/{name}") for name in config.sidecars()}
        self.hashes = {name: config_hash(sem) for name, sem in config.sidecars().items()}

    def done_shards(self) -> list[str]:
        return sorted(set().union(*(set(d.done_shards()) for d in self.dirs.values())))

    def _marker(self, name: str, shard: str) -> dict[str, Any] | None:
        d = self.dirs[name]
        if not d.fs.exists(d.path(f"{shard}.done.json")):
            return None
        return d.read_done(shard)

    def current(self, name: str, shard: str, *, marker: Any = False, upstream: str | None = None) -> bool:
        """Whether sidecar `name` of `shard` is done with this config, from the captions shard as it is now.

        `marker` and `upstream` (the captions shard's lineage) may be passed when already read.
        """
        marker = self._marker(name, shard) if marker is False else marker
        if marker is None or marker.get("config_hash") != self.hashes[name]:
            return False
        if upstream is None:
            upstream = self.upstream.read_done(shard).get("lineage", "")
        return marker.get("input_lineage") == self.input_lineage(name, shard, upstream)

    def input_lineage(self, name: str, shard: str, upstream: str) -> str:
        """What sidecar `name` of `shard` is made from: the captions shard (`upstream`), and a named set's shard."""
        if self.text_set is None or name != self.config.t5_sidecar:
            return upstream
        return config_hash({"input": upstream, "set": self.text_set.read_done(shard).get("lineage", "")})

    def read_done(self, shard: str) -> dict[str, Any]:
        """One summary over the sidecars present: a failed sample counts once, with the first sidecar's reason."""
        markers = {name: self._marker(name, shard) for name in self.dirs}
        present = {name: m for name, m in markers.items() if m is not None}
        upstream = self.upstream.read_done(shard).get("lineage", "")
        stale = sorted(name for name, m in present.items() if m.get("config_hash") != self.hashes[name])
        chash = config_hash(self.config.semantics()) if not stale else "changed: " + ", ".join(stale)
        first_failure: dict[str, tuple[str, str]] = {}  # key -> (status, reason)
        keys: list[str] = []
        for name in present:
            index = self.dirs[name].read_index(shard).select(["key", "status", "error_reason"]).to_pylist()
            if not keys:
                keys = [row["key"] for row in index]
            for row in index:
                if row["status"] != OK and row["key"] not in first_failure:
                    first_failure[row["key"]] = (row["status"], row["error_reason"] or "unknown")
        by_reason: dict[str, int] = {}
        by_skipped: dict[str, int] = {}
        by_status = {OK: len(keys) - len(first_failure)}
        for status, reason in first_failure.values():
            by_status[status] = by_status.get(status, 0) + 1
            tally = by_skipped if status == SKIPPED else by_reason
            tally[reason] = tally.get(reason, 0) + 1
        complete = all(self.current(name, shard, marker=m, upstream=upstream) for name, m in markers.items())
        inputs = {m.get("input_lineage") for m in present.values()}
        if complete:  # every sidecar is made from the captions shard as it is (a named set's lineage joins it)
            inputs = {upstream}
        return {
            "shard": shard,
            "config_hash": chash,
            "input_lineage": inputs.pop() if len(inputs) == 1 else None,  # sidecars from different inputs: outdated
            "complete": complete,
            "rows": len(keys),
            "by_status": {k: v for k, v in by_status.items() if v},
            "by_reason": by_reason,
            "by_skipped": by_skipped,
        }

    def remove_shard(self, shard: str) -> None:
        for d in self.dirs.values():
            d.remove_shard(shard)

    def remove_stale_temporaries(self) -> None:
        for d in self.dirs.values():
            d.remove_stale_temporaries()


class _OrderedWrites:
    """Adds members in the input's key order, whatever order batches finish in (buckets fill unevenly).

    Holds finished members only until the keys before them are done; None marks a key with nothing to write.
    """

    def __init__(self, writer: ShardWriter, keys: list[str]) -> None:
        self.writer, self.keys, self.pos = writer, keys, 0
        self.ready: dict[str, dict[str, bytes] | None] = {}

    def put(self, key: str, members: dict[str, bytes] | None) -> None:
        self.ready[key] = members
        while self.pos < len(self.keys) and self.keys[self.pos] in self.ready:
            done = self.ready.pop(self.keys[self.pos])
            if done is not None:
                self.writer.add(self.keys[self.pos], done)
            self.pos += 1

    def close(self) -> None:
        if self.pos != len(self.keys):
            raise RuntimeError(f"shard {self.writer.shard}: {len(self.keys) - self.pos} keys were never written")


def _row(sample: Sample, **extra: Any) -> dict[str, Any]:
    return {
        "key": sample.key,
        "status": sample.status,
        "error_reason": sample.error_reason,
        "error": sample.error,
        **extra,
    }


def _counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    by_status: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        if r["error_reason"]:
            by_reason[r["error_reason"]] = by_reason.get(r["error_reason"], 0) + 1
    return {"by_status": by_status, "by_reason": by_reason}


class FeaturesStage:
    """Loads T5 and the VAE once per worker; `process` writes a shard's sidecars that are not current."""

    def __init__(self, output: str, config: FeaturesConfig) -> None:
        self.config = config
        self.input = StageDir(f"{output.rstrip('/')}/{INPUT}")
        self.dirs = FeatureDirs(output, config)
        c = config
        self.t5 = T5Features(
            TextFeatureConfig(
                c.t5,
                max_length=c.max_length,
                clean_caption=c.clean_caption,
                batch_size=c.t5_batch_size,
                device=c.device,
            )
        )
        self.vae = VaeFeatures(
            VaeFeatureConfig(c.vae, batch_size=c.vae_batch_size, device=c.device, compile=c.compile_vae)
        )

    def setup(self) -> None:
        self.t5.setup()
        self.vae.setup()

    def process(self, shard: str, _payload: Any = None) -> dict[str, Any]:
        todo = [name for name in self.dirs.dirs if not self.dirs.current(name, shard)]
        samples = table_to_samples(self.input.read_index(shard))
        if self.dirs.duplicates is not None:  # removed duplicates become skipped rows in every sidecar
            self.dirs.duplicates.skip(shard, samples)
        if self.config.t5_sidecar in todo:
            self._write_t5(shard, samples)
        c = self.config
        resolutions = [r for r in sorted(set(c.resolutions)) if vae_sidecar(r, c.multiscale, c.vae_tag) in todo]
        if resolutions:
            self._write_vae(shard, samples, resolutions)
        return {**self.dirs.read_done(shard), "sidecars_written": todo}

    # -- T5 ------------------------------------------------------------------------------------------------
    def _write_t5(self, shard: str, samples: list[Sample]) -> None:
        texts: dict[str, str] = {}
        rows = []
        for s, text in self._texts(shard, samples):
            if s.status == OK and (text is None or not text.strip()):
                s = dataclasses.replace(s)  # the failure is this sidecar's, not the captions row's
                s.fail("no_text", f"sample {s.key} has no {self.config.field} text")
            if s.status == OK:
                texts[s.key] = text
            rows.append(_row(s, tokens=None, text=text))
        keys = list(texts)
        counts = dict(zip(keys, self.t5.token_counts([texts[k] for k in keys]).tolist(), strict=True))
        for r in rows:
            r["tokens"] = counts.get(r["key"])
        dtype = np.dtype(self.config.dtype)
        window = _T5_WINDOW_BATCHES * self.config.t5_batch_size
        with ShardWriter(self.dirs.dirs[self.config.t5_sidecar], shard) as writer:
            for start in range(0, len(keys), window):
                chunk = keys[start : start + window]
                features, mask = self.t5.encode([texts[k] for k in chunk], dtype=dtype)
                for i, key in enumerate(chunk):
                    writer.add(
                        key,
                        {"t5.npy": npy_bytes(features[i]), "t5mask.npy": npy_bytes(mask[i].astype(np.uint8))},
                    )
            done = self._done(self.config.t5_sidecar, shard, rows, dim=self.t5.dim)
            writer.commit(pa.Table.from_pylist(rows, schema=T5_INDEX), done)

    def _texts(self, shard: str, samples: list[Sample]) -> Iterator[tuple[Sample, str | None]]:
        """(sample, text to encode): its field, or its caption in the named set (failed there: failed here too)."""
        if self.dirs.text_set is None:
            attr = FIELDS[self.config.field]
            yield from ((s, getattr(s, attr)) for s in samples)
            return
        index = self.dirs.text_set.read_index(shard).select(["key", "status", "error_reason", "error", "caption"])
        named = {r["key"]: r for r in index.to_pylist()}
        for s in samples:
            row = named.get(s.key)
            if s.status == OK and row is None:
                s = dataclasses.replace(s)  # the failure is this sidecar's, not the captions row's
                s.fail("missing_caption", f"{s.key} is not in caption set {self.config.field}")
            elif s.status == OK and row["status"] != OK:
                s = dataclasses.replace(s)
                s.fail(row["error_reason"] or "failed", row["error"] or "")
            yield s, (row or {}).get("caption")

    # -- VAE ------------------------------------------------------------------------------------------------
    def _size(self, sample: Sample, resolution: int) -> tuple[str | None, tuple[int, int]]:
        if not self.config.multiscale:
            return None, (resolution, resolution)
        bucket = getattr(sample, f"bucket_{resolution}")
        return bucket, bucket_size(bucket, resolution)

    def _write_vae(self, shard: str, samples: list[Sample], resolutions: list[int]) -> None:
        ms = self.config.multiscale
        ok = {s.key: s for s in samples if s.status == OK}
        names = {r: vae_sidecar(r, ms, self.config.vae_tag) for r in resolutions}
        writers: dict[int, ShardWriter] = {}
        try:
            for r in resolutions:  # inside the try: a writer that fails to open must not leak the others
                writers[r] = ShardWriter(self.dirs.dirs[names[r]], shard)
            sinks = {r: _OrderedWrites(writers[r], list(ok)) for r in resolutions}
            failures: dict[str, tuple[str, str]] = {}
            pending: dict[tuple[int, tuple[int, int]], list[tuple[str, np.ndarray]]] = {}

            def flush(r: int, size: tuple[int, int]) -> None:
                batch = pending.pop((r, size))
                latents = self.vae.encode_pixels(np.stack([px for _, px in batch]), size)
                for (key, _), latent in zip(batch, latents, strict=True):
                    sinks[r].put(key, self._vae_members(ok[key], r, size, latent))

            seen = set()
            for result in prefetch(
                self._images(shard, ok),
                lambda kv: self._prepare(shard, ok[kv[0]], kv[1], resolutions),
                threads=self.config.decode_threads,
                ahead=2 * self.config.decode_threads,
            ):
                if isinstance(result, Exception):
                    raise result  # not a decode failure (those come back as values): fail the shard
                key, prepared = result
                seen.add(key)
                if isinstance(prepared, ImageDecodeError):
                    failures[key] = (prepared.reason, f"{shard}/{key}: {prepared}")
                    for sink in sinks.values():
                        sink.put(key, None)
                    continue
                for r, (size, pixels) in prepared.items():
                    pending.setdefault((r, size), []).append((key, pixels))
                    if len(pending[(r, size)]) >= self.config.vae_batch_size:
                        flush(r, size)
            for key in ok.keys() - seen:
                failures[key] = ("missing_image", f"{shard}/{key}: no image member in the captions tar")
                for sink in sinks.values():
                    sink.put(key, None)
            for r, size in sorted(pending):
                flush(r, size)
            for r in resolutions:
                sinks[r].close()
                rows = self._vae_rows(samples, r, failures)
                writers[r].commit(pa.Table.from_pylist(rows, schema=VAE_INDEX), self._done(names[r], shard, rows))
        except BaseException:
            for w in writers.values():
                w.abort()
            raise

    def _vae_members(
        self, sample: Sample, resolution: int, size: tuple[int, int], latent: np.ndarray
    ) -> dict[str, bytes]:
        meta = {
            "key": sample.key,
            "bucket": self._size(sample, resolution)[0],
            "height": size[0],
            "width": size[1],
            "resolution": resolution,
            "multiscale": self.config.multiscale,
            "orig_height": sample.height,
            "orig_width": sample.width,
        }
        return {"vae.npy": npy_bytes(latent), "json": json.dumps(meta).encode()}

    def _vae_rows(
        self, samples: list[Sample], resolution: int, failures: dict[str, tuple[str, str]]
    ) -> list[dict[str, Any]]:
        rows = []
        for s in samples:
            bucket, (h, w) = self._size(s, resolution) if s.status == OK else (None, (None, None))
            row = _row(s, bucket=bucket, height=h, width=w, orig_height=s.height, orig_width=s.width)
            if s.key in failures:
                row.update(status=FAILED, error_reason=failures[s.key][0], error=failures[s.key][1])
            rows.append(row)
        return rows

    def _images(self, shard: str, ok: dict[str, Sample]) -> Iterator[tuple[str, bytes]]:
        for key, members in self.input.iter_samples(shard):
            if key in ok and ok[key].ext in members:
                yield key, members[ok[key].ext]

    def _prepare(
        self, shard: str, sample: Sample, data: bytes, resolutions: list[int]
    ) -> tuple[str, dict[int, tuple[tuple[int, int], np.ndarray]] | ImageDecodeError]:
        """Decode once (JPEG DCT-scaled to the largest target), then one uint8 crop per resolution."""
        sizes = {r: self._size(sample, r)[1] for r in resolutions}
        covers = [cover_size(sample.height, sample.width, size) for size in sizes.values()]
        ch, cw = max(covers, key=lambda hw: hw[0] * hw[1])
        try:
            image = decode_image(data, target_size=(cw, ch))
            return sample.key, {r: (size, to_pixels(image, size)) for r, size in sizes.items()}
        except ImageDecodeError as exc:
            return sample.key, exc
        except Exception as exc:  # not the image's fault: stop with the sample and shard named
            raise RuntimeError(f"{self.input.path(shard)} {sample.key}: {type(exc).__name__}: {exc}") from exc

    def _done(self, name: str, shard: str, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        semantics = self.config.sidecars()[name]
        upstream = self.dirs.upstream.read_done(shard).get("lineage", "")
        return {
            "stage": f"features/{name}",
            **lineage(self.dirs.hashes[name], {"lineage": self.dirs.input_lineage(name, shard, upstream)}),
            "semantics": semantics,
            **_counts(rows),
            **extra,
        }


def run_features(
    output: str,
    config: FeaturesConfig,
    *,
    ray_address: str | None = None,
    force: bool = False,
    progress: bool = True,
):
    """Compute the sidecars of every done captions shard on Ray; done ones are skipped (resumable)."""
    from curation.runner import Resources, SetupError, run_stage

    shards = StageDir(f"{output.rstrip('/')}/{INPUT}").done_shards()
    dirs = FeatureDirs(output, config)
    if dirs.text_set is not None and (missing := sorted(set(shards) - set(dirs.text_set.done_shards()))):
        raise SetupError(
            f"caption set {config.field!r} lacks {len(missing)} shard(s) of {INPUT}/ (e.g. {missing[0]}): "
            f"run `curation caption --name {config.field}` first"
        )
    return run_stage(
        output=output,
        stage_dir=dirs,
        input_dir=dirs.upstream,
        make_stage=lambda: FeaturesStage(output, config),
        tasks=[(shard, None) for shard in shards],
        semantics=config.semantics(),
        # "auto": one GPU per actor where the cluster has GPUs, CPU actors where it has none (laptops, CI).
        resources=Resources(
            num_cpus=1,
            num_gpus=0 if config.device == "cpu" else 1,
            gpu_optional=config.device == "auto",
        ),
        ray_address=ray_address,
        force=force,
        progress=progress,
    )
