"""Caption stage: `images/` shards -> `captions/` shards (original bytes, `<key>.txt` caption, `<key>.json` record),
or `captions-<NAME>/` for a named caption set (`<key>.txt` and `<key>.json` only: see `curation.caption.sets`).

The CPU front end works ahead of the model in two bounded thread pools: one decodes the next images, one runs the
processor (preprocessing, tokenisation) on the next batches, so the model's thread only moves ready tensors to the
device and generates. Samples that failed upstream or fail to decode here stay rows of the index with their reason,
and are never dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from curation.caption.model import DEFAULT_PROMPT, CaptionConfig, Captioner, Prepared
from curation.caption.sets import DEFAULT_SET, ORIGINAL, set_dir, template_fields
from curation.dedup.filter import DuplicateFilter
from curation.imaging import ImageDecodeError, decode_image, prefetch
from curation.records import OK, Sample, count_statuses, samples_to_table, table_to_samples
from curation.shards import ShardWriter, StageDir, config_hash, lineage

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"


@dataclass(frozen=True)
class CaptionStageConfig:
    model: CaptionConfig = field(default_factory=lambda: CaptionConfig(model=DEFAULT_MODEL, prompt=DEFAULT_PROMPT))
    decode_threads: int = max(2, min(8, (os.cpu_count() or 2)))
    workers: int | None = None  # actors; default one per GPU, or per free CPU without GPUs
    include_duplicates: bool = False  # caption the samples dedup removes too (not in semantics: in the lineage)
    name: str = DEFAULT_SET  # the caption set (its folder, not its content: not in semantics)

    def __post_init__(self) -> None:
        set_dir(self.name)  # refuses a malformed or reserved name
        template_fields(self.model.prompt)  # refuses a malformed template before any model loads

    @property
    def folder(self) -> str:
        return set_dir(self.name)

    def semantics(self) -> dict:
        """Model, prompt and generation parameters decide the captions; batch size, threads, cache kind do not
        (so their defaults, resolved per device, keep one config hash across CPU and GPU workers)."""
        model = asdict(self.model)
        for volatile in ("batch_size", "device", "num_threads", "cache_implementation"):
            model.pop(volatile)
        if not self.model.do_sample:  # greedy decoding never reads them
            for unused in ("temperature", "top_p", "seed"):
                model.pop(unused)
        return model


class CaptionStage:
    def __init__(self, output: str, config: CaptionStageConfig) -> None:
        root = output.rstrip("/")
        self.images = StageDir(f"{root}/images")
        self.stage_dir = StageDir(f"{root}/{config.folder}")
        self.config = config
        self.needs_original = ORIGINAL in template_fields(config.model.prompt)
        # A template (fields, or `{{` escapes) is formatted per image; a plain prompt keeps its one prepared text.
        self.templated = "{" in config.model.prompt or "}" in config.model.prompt
        self.duplicates = DuplicateFilter.for_stage(output, self.images, config.include_duplicates)
        self.captioner = Captioner(config.model)

    def setup(self) -> None:
        self.captioner.setup()
        self._provenance = self.captioner.provenance()

    def process(self, shard: str, payload: None = None) -> dict:
        samples = {s.key: s for s in table_to_samples(self.images.read_index(shard))}
        if self.duplicates is not None:  # removed duplicates become skipped rows, never captioned
            self.duplicates.skip(shard, samples.values())
        if self.needs_original:
            for s in samples.values():
                if s.status == OK and not (s.original_caption or "").strip():
                    s.fail("no_original", f"prompt template needs {{original}}; sample {s.key} has none")
        cap_counts: dict[str, int] = {}
        with ShardWriter(self.stage_dir, shard) as writer:
            for batch, prepared in self._prepared_batches(shard, samples):
                ok = [(s, raw, img) for s, raw, img in batch if not isinstance(img, Exception)]
                for sample, _, error in batch:
                    if isinstance(error, Exception):
                        reason = error.reason if isinstance(error, ImageDecodeError) else "decode_error"
                        sample.fail(reason, str(error))
                results = self.captioner.generate(prepared) if prepared is not None else []
                for (sample, raw, _), result in zip(ok, results, strict=True):
                    sample.caption, sample.caption_status = result.text, result.status
                    cap_counts[result.status] = cap_counts.get(result.status, 0) + 1
                    record = sample.to_dict() | {"provenance": self._provenance, "new_tokens": result.new_tokens}
                    members = {
                        "txt": result.text.encode(),
                        "json": json.dumps(record, ensure_ascii=False, sort_keys=True).encode(),
                    }
                    if self.config.name == DEFAULT_SET:  # named sets join `images/` by key for the bytes
                        members[sample.ext] = raw
                    writer.add(sample.key, members)
            rows = sorted(samples.values(), key=lambda s: s.key)
            done = {
                "stage": self.config.folder,
                **lineage(config_hash(self.config.semantics()), (self.duplicates or self.images).read_done(shard)),
                "by_caption_status": cap_counts,
                "provenance": self._provenance,
                **count_statuses(rows),
            }
            return writer.commit(samples_to_table(rows), done)

    def _prepared_batches(
        self, shard: str, samples: dict[str, Sample]
    ) -> Iterator[tuple[list[tuple[Sample, bytes, object]], Prepared | None]]:
        """Batches of (sample, original bytes, RGB image or the decode error), each with the model inputs of its
        decoded images (None when none decoded), made ahead of the model."""
        size = self.captioner.input_size

        def decode(item: tuple[Sample, bytes]) -> tuple[Sample, bytes, object]:
            sample, raw = item
            try:
                return sample, raw, decode_image(raw, target_size=size)
            except ImageDecodeError as exc:
                return sample, raw, exc

        def todo() -> Iterator[tuple[Sample, bytes]]:
            for key, members in self.images.iter_samples(shard):
                sample = samples[key]
                if sample.status == OK:
                    yield sample, members[sample.ext]

        def prepare(batch: list[tuple[Sample, bytes, object]]) -> tuple[list, Prepared | None]:
            decoded = [(s, img) for s, _, img in batch if not isinstance(img, Exception)]
            if not decoded:
                return batch, None
            images = [img for _, img in decoded]
            template = self.config.model.prompt
            prompts = [template.format(original=s.original_caption) for s, _ in decoded] if self.templated else None
            return batch, self.captioner.prepare(images, prompts)

        batch_size = self.captioner.batch_size
        threads = self.config.decode_threads
        # Decoding runs 2 batches ahead, so pulling the batch after next (below) finds its images decoded.
        decoded = prefetch(todo(), decode, threads=threads, ahead=2 * batch_size + threads)
        # Two batches in the processor while the model generates: one more would only hold memory.
        for outcome in prefetch(_chunks(decoded, batch_size), prepare, threads=2, ahead=2):
            if isinstance(outcome, Exception):  # decode errors are per sample; a processor error fails the shard
                raise outcome
            yield outcome


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_caption(
    output: str,
    config: CaptionStageConfig,
    *,
    ray_address: str | None = None,
    force: bool = False,
    progress: bool = True,
):
    """Caption every done `images/` shard that has no done shard in the caption set's folder yet."""
    from curation.runner import Resources, run_stage

    images = StageDir(f"{output.rstrip('/')}/images")
    shards = images.done_shards()
    return run_stage(
        output=output,
        stage_dir=StageDir(f"{output.rstrip('/')}/{config.folder}"),
        input_dir=DuplicateFilter.for_stage(output, images, config.include_duplicates) or images,
        make_stage=lambda: CaptionStage(output, config),
        tasks=[(s, None) for s in shards],
        semantics=config.semantics(),
        resources=Resources(
            num_cpus=1,
            num_gpus=0 if config.model.device == "cpu" else 1,
            gpu_optional=config.model.device == "auto",
            workers=config.workers,
        ),
        ray_address=ray_address,
        force=force,
        progress=progress,
    )
