"""Caption stage: `images/` shards -> a caption set's shards, `captions/` (the set `default`) or `captions-<NAME>/`:
`<key>.txt` caption and `<key>.json` record. Every set is a peer and holds text only: the image bytes stay in
`images/`, the one copy every later stage reads them from, unless `--self-contained` asks for them in the set's tar
too (a training shard that needs no join). Outputs made before keep their `captions/` tars with bytes.

The CPU front end works ahead of the model in two bounded thread pools: one decodes the next images, one runs the
processor (preprocessing, tokenisation) on the next batches, so the model's thread only moves ready tensors to the
device and generates. Samples that failed upstream or fail to decode here stay rows of the index with their reason,
and are never dropped; samples a `SampleFilter` removes (dedup's duplicates) are skipped rows, never captioned.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from curation.caption.model import DEFAULT_PROMPT, CaptionConfig, Captioner, Prepared
from curation.caption.sets import template_fields
from curation.imaging import ImageDecodeError, chunks, decode_image, prefetch
from curation.layout import DEFAULT_SET, ORIGINAL, Layout
from curation.models import check_model
from curation.records import OK, Sample, count_statuses, samples_to_table, table_to_samples
from curation.shards import DoneMarker, ShardWriter, config_hash, lineage
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

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"


@dataclass(frozen=True)
class CaptionStageConfig:
    model: CaptionConfig = field(
        default_factory=lambda: CaptionConfig(model=DEFAULT_MODEL, prompt=DEFAULT_PROMPT),
        metadata={"help": "the captioning model, prompt and generation parameters"},
    )
    decode_threads: int = field(
        default=max(2, min(8, (os.cpu_count() or 2))), metadata={"help": "CPU decode threads per actor"}
    )
    workers: int | None = field(
        default=None, metadata={"help": "actors (default: one per GPU, or per CPU without)"}
    )  # how fast, not what: not in semantics
    include: tuple[str, ...] = include_field("caption")  # not in semantics: in the lineage
    name: str = field(
        default=DEFAULT_SET, metadata={"help": "caption set [a-z0-9_]+ (default: captions/, else captions-NAME/)"}
    )  # the caption set (its folder, not its content: not in semantics)
    self_contained: bool = field(
        default=False,
        metadata={"help": "also store each image's bytes in the set's tar (default: text only; images/ has them)"},
    )  # in semantics only when on, so the sets of earlier outputs (bytes in captions/) keep their config hash

    def __post_init__(self) -> None:
        Layout.captions_folder(self.name)  # refuses a malformed or reserved name
        template_fields(self.model.prompt)  # refuses a malformed template before any model loads
        object.__setattr__(self, "include", check_include(self.include))

    @property
    def folder(self) -> str:
        """The set's folder, relative to the output: `captions` or `captions-NAME`."""
        return Layout.captions_folder(self.name)

    def semantics(self) -> dict:
        """Model, prompt and generation parameters decide the captions; batch size, threads, cache kind do not
        (so their defaults, resolved per device, keep one config hash across CPU and GPU workers)."""
        model = asdict(self.model)
        for volatile in ("batch_size", "device", "num_threads", "cache_implementation"):
            model.pop(volatile)
        if not self.model.do_sample:  # greedy decoding never reads them
            for unused in ("temperature", "top_p", "seed"):
                model.pop(unused)
        return model | ({"self_contained": True} if self.self_contained else {})


class CaptionStage(Stage):
    name = "caption"
    help = "images/ -> a caption set (captions/ or captions-NAME/) with LLaVA (the PixArt-alpha prompt by default)"
    config_type = CaptionStageConfig

    def needs(self) -> list[Needs]:
        return [needs_images(self.layout)]

    def preflight(self) -> None:
        check_model(self.config.model.model, "--model", revision=self.config.model.revision)

    def passes(self, ctx: RunContext) -> Iterator[Pass]:
        """One pass: every done `images/` shard -> the caption set's folder."""
        config, layout = self.config, self.layout
        view = self.input_view(layout.images)
        yield Pass(
            label=config.folder,
            folder=layout.captions(config.name),
            make_worker=functools.partial(CaptionWorker, layout, config, view),
            tasks=[(shard, None) for shard in layout.images.done_shards()],
            semantics=config.semantics(),
            resources=Resources.for_device(config.model.device, config.workers),
            upstream=view,
        )

    def outputs(self) -> list[str]:
        return [f"captions: {self.layout.captions(self.config.name).url}/"]


class CaptionWorker:
    """Captions one `images/` shard into the caption set's folder; the model loads once per worker."""

    def __init__(self, layout: Layout, config: CaptionStageConfig, view: InputView | None = None) -> None:
        self.images = layout.images
        # The stage gives its view; benches and tests that build a worker alone get the same one.
        self.input = view or CaptionStage(layout, config).input_view(self.images)
        self.stage_dir = layout.captions(config.name)
        self.config = config
        self.needs_original = ORIGINAL in template_fields(config.model.prompt)
        # A template (fields, or `{{` escapes) is formatted per image; a plain prompt keeps its one prepared text.
        self.templated = "{" in config.model.prompt or "}" in config.model.prompt
        self.captioner = Captioner(config.model)

    def setup(self) -> None:
        self.captioner.setup()
        self._provenance = self.captioner.provenance()

    def process(self, shard: str, payload: None = None, rows_done: RowsDone = no_progress) -> DoneMarker:
        samples = {s.key: s for s in table_to_samples(self.images.read_index(shard))}
        self.input.skip(shard, samples.values())  # removed samples (duplicates) become skipped rows, never captioned
        if self.needs_original:
            for s in samples.values():
                if s.status == OK and not (s.original_caption or "").strip():
                    s.fail("no_original", f"prompt template needs {{original}}; sample {s.key} has none")
        cap_counts: dict[str, int] = {}
        done_rows = sum(s.status != OK for s in samples.values())  # rows with nothing to caption are done already
        rows_done(done_rows, len(samples))
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
                    if self.config.self_contained:  # otherwise readers join `images/` by key for the bytes
                        members[sample.ext] = raw
                    writer.add(sample.key, members)
                done_rows += len(batch)
                rows_done(done_rows, len(samples))
            rows = sorted(samples.values(), key=lambda s: s.key)
            done = DoneMarker(
                shard,
                stage=self.config.folder,
                **lineage(config_hash(self.config.semantics()), self.input.read_done(shard).upstream),
                counts={"by_caption_status": cap_counts, **count_statuses(rows)},
                extra={"provenance": self._provenance},
            )
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
        for outcome in prefetch(chunks(decoded, batch_size), prepare, threads=2, ahead=2):
            if isinstance(outcome, Exception):  # decode errors are per sample; a processor error fails the shard
                raise outcome
            yield outcome


def run_caption(output: str, config: CaptionStageConfig, **kw) -> StageRun:
    """`curation caption` from Python: see `curation.runner.run` for the keywords."""
    from curation.runner import run

    return run(CaptionStage(Layout(output), config), **kw)
