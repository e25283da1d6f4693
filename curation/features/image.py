"""The VAE kind: latents of the images shard's images, one sidecar per resolution, from one decode per image.

    OUT/features/vae{R}/NNNNN.tar    <key>.vae.npy (2C, h/8, w/8) float32 at R x R (single scale), and
    OUT/features/vae{R}ms/NNNNN.tar  at the sample's bucket size for base R (multi-scale); <key>.json sizes

A VAE other than α's may be given a tag, `vae512-sdxl`, `vae1024ms-sdxl`, so its latents sit beside the SD VAE's.
Each resolution is its own sidecar (own config hash): adding one later computes only that sidecar.
The model is `vae.py`'s `VaeFeatures`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from curation.buckets import bucket_size
from curation.features.npy import npy_bytes
from curation.features.sidecar import FeatureKind, ShardJob, row
from curation.features.vae import VaeFeatureConfig, VaeFeatures, cover_size, to_pixels
from curation.imaging import ImageDecodeError, decode_image, prefetch
from curation.records import FAILED, OK, Sample
from curation.shards import ShardWriter

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # PixArt-alpha's VAE

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


class ImageLatents(FeatureKind):
    """VAE posterior moments at each of the config's resolutions (R x R crops, or bucket sizes with multiscale)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        c = config
        self.model = VaeFeatures(
            VaeFeatureConfig(c.vae, batch_size=c.vae_batch_size, device=c.device, compile=c.compile_vae)
        )
        self.names = {r: vae_sidecar(r, c.multiscale, c.vae_tag) for r in sorted(set(c.resolutions))}

    def sidecars(self) -> dict[str, dict[str, Any]]:
        c = self.config
        return {name: {"vae": c.vae, "resolution": r, "multiscale": c.multiscale} for r, name in self.names.items()}

    def setup(self) -> None:
        self.model.setup()
        # A DC-AE's latents are the latent itself: its marker says so, with the scale the trainer applies (Sana's
        # export reads both); a KL VAE's markers stay as they were.
        self.latent = (
            {"latent": "dcae", "scaling_factor": self.model.scaling_factor} if self.model.deterministic else {}
        )

    def _size(self, sample: Sample, resolution: int) -> tuple[str | None, tuple[int, int]]:
        if not self.config.multiscale:
            return None, (resolution, resolution)
        bucket = getattr(sample, f"bucket_{resolution}")
        return bucket, bucket_size(bucket, resolution)

    def write(self, job: ShardJob, sidecars: list[str]) -> None:
        """All asked resolutions at once: each image is decoded once, then cropped per resolution."""
        shard, samples = job.shard, job.samples
        resolutions = [r for r, name in self.names.items() if name in sidecars]
        names = {r: self.names[r] for r in resolutions}
        ok = {s.key: s for s in samples if s.status == OK}
        writers: dict[int, ShardWriter] = {}
        try:
            for r in resolutions:  # inside the try: a writer that fails to open must not leak the others
                writers[r] = job.writer(names[r])
            sinks = {r: _OrderedWrites(writers[r], list(ok)) for r in resolutions}
            failures: dict[str, tuple[str, str]] = {}
            pending: dict[tuple[int, tuple[int, int]], list[tuple[str, np.ndarray]]] = {}

            def flush(r: int, size: tuple[int, int]) -> None:
                batch = pending.pop((r, size))
                latents = self.model.encode_pixels(np.stack([px for _, px in batch]), size)
                for (key, _), latent in zip(batch, latents, strict=True):
                    sinks[r].put(key, self._members(ok[key], r, size, latent))

            seen = set()
            for result in prefetch(
                self._images(job, ok),
                lambda kv: self._prepare(job, ok[kv[0]], kv[1], resolutions),
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
                failures[key] = ("missing_image", f"{shard}/{key}: no image member in the images tar")
                for sink in sinks.values():
                    sink.put(key, None)
            for r, size in sorted(pending):
                flush(r, size)
            for r in resolutions:
                sinks[r].close()
                rows = self._rows(samples, r, failures)
                writers[r].commit(pa.Table.from_pylist(rows, schema=VAE_INDEX), job.done(names[r], rows, **self.latent))
        except BaseException:
            for w in writers.values():
                w.abort()
            raise

    def _members(self, sample: Sample, resolution: int, size: tuple[int, int], latent: np.ndarray) -> dict[str, bytes]:
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

    def _rows(
        self, samples: list[Sample], resolution: int, failures: dict[str, tuple[str, str]]
    ) -> list[dict[str, Any]]:
        rows = []
        for s in samples:
            bucket, (h, w) = self._size(s, resolution) if s.status == OK else (None, (None, None))
            r = row(s, bucket=bucket, height=h, width=w, orig_height=s.height, orig_width=s.width)
            if s.key in failures:
                r.update(status=FAILED, error_reason=failures[s.key][0], error=failures[s.key][1])
            rows.append(r)
        return rows

    def _images(self, job: ShardJob, ok: dict[str, Sample]) -> Iterator[tuple[str, bytes]]:
        for key, members in job.images():
            if key in ok and ok[key].ext in members:
                yield key, members[ok[key].ext]

    def _prepare(
        self, job: ShardJob, sample: Sample, data: bytes, resolutions: list[int]
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
            raise RuntimeError(f"{job.dirs.images.path(job.shard)} {sample.key}: {type(exc).__name__}: {exc}") from exc
