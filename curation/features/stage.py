"""Features stage: `images/` shards (and a caption set's text) -> feature sidecars with the same shard names and keys.

    OUT/features/<sidecar>/NNNNN.tar      members of each sample, in the images shard's key order
    OUT/features/<sidecar>/NNNNN.parquet  one row per sample, failed ones included
    OUT/features/<sidecar>/NNNNN.done.json  last

Each kind of feature writes its own sidecars (`KINDS`; the interface is `curation.features.sidecar.FeatureKind`):
T5 text features (`text.py`: `t5`, `t5-<field>-<L>`) and VAE latents (`image.py`: `vae{R}`, `vae{R}ms`,
`vae{R}-<tag>`). Each sidecar has its own config hash: adding a resolution later computes only that sidecar, and a
shard is pending while any sidecar lacks a current done marker (`FeatureDirs` presents this to the runner).
The shard list, the samples and the image bytes come from `images/` through the input view (keep flags applied);
the text of any caption set from its folder (`captions/`, `captions-<NAME>/`), the originals from `images/`' records.

Run: `curation features --output OUT --t5 DeepFloyd/t5-v1_1-xxl --vae stabilityai/sd-vae-ft-ema`
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from curation.buckets import BASES
from curation.errors import ConfigError
from curation.features.image import DEFAULT_VAE, ImageLatents, vae_sidecar
from curation.features.sidecar import FeatureDirs, FeatureKind, ShardJob
from curation.features.text import (
    DEFAULT_T5,
    FIELDS,
    SIGMA_MAX_LENGTH,
    STORAGE_DTYPES,
    T5_SIDECAR,
    TextFeatures,
    t5_sidecar,
)
from curation.layout import DEFAULT_SET, Layout, check_set_name
from curation.models import check_model
from curation.records import table_to_samples
from curation.shards import DoneMarker
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

__all__ = [
    "DEFAULT_T5",
    "DEFAULT_VAE",
    "FIELDS",
    "KINDS",
    "SIGMA_MAX_LENGTH",
    "STORAGE_DTYPES",
    "T5_SIDECAR",
    "FeatureDirs",
    "FeaturesConfig",
    "FeaturesStage",
    "FeaturesWorker",
    "run_features",
    "t5_sidecar",
    "vae_sidecar",
]

# The kinds of feature a run writes, in sidecar order (a sample's failure is tallied with the first one's reason).
KINDS: list[type[FeatureKind]] = [
    TextFeatures,  # T5 text features: t5, t5-<field>-<L>
    ImageLatents,  # VAE latents: vae{R}, vae{R}ms, vae{R}-<tag>
]


@dataclass(frozen=True)
class FeaturesConfig:
    t5: str = dataclasses.field(default=DEFAULT_T5, metadata={"help": "T5 encoder Hub id or folder"})
    vae: str = dataclasses.field(default=DEFAULT_VAE, metadata={"help": "AutoencoderKL Hub id or folder"})
    max_length: int = dataclasses.field(
        default=120, metadata={"help": "T5 tokens (120 for PixArt-alpha, 300 for Sigma)"}
    )
    resolutions: tuple[int, ...] = dataclasses.field(
        default=(256, 512, 1024), metadata={"help": f"comma-separated bucket bases (of {', '.join(map(str, BASES))})"}
    )
    multiscale: bool = dataclasses.field(
        default=False, metadata={"help": "latents at each image's aspect-ratio bucket"}
    )
    # PixArt-alpha trained on float32 features: the export converts.
    dtype: str = dataclasses.field(
        default="float16", metadata={"help": "T5 feature storage", "choices": list(STORAGE_DTYPES)}
    )
    field: str = dataclasses.field(
        default="caption",
        metadata={"help": "text to encode: a caption set's name (caption: the set default), or original"},
    )
    clean_caption: bool = dataclasses.field(
        default=True, metadata={"help": "clean the text as PixArt-alpha does (lower case, no URLs or HTML)"}
    )
    t5_batch_size: int = dataclasses.field(default=64, metadata={"help": "captions per T5 batch"})
    vae_batch_size: int = dataclasses.field(default=16, metadata={"help": "images per VAE batch"})
    device: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "where the models run (auto: a GPU per worker where the cluster has GPUs, else the CPU)",
            "choices": ["auto", "cuda", "cpu"],
            "aliases": ["--feature-device"],
        },
    )
    compile_vae: bool = dataclasses.field(
        default=False, metadata={"help": "torch.compile the VAE (faster at one size; each new bucket recompiles)"}
    )
    decode_threads: int = dataclasses.field(default=4, metadata={"help": "image decode threads per worker"})
    include: tuple[str, ...] = include_field("encode")  # not in semantics: the removed samples are in the lineage
    vae_tag: str | None = dataclasses.field(
        default=None, metadata={"help": "names the VAE sidecars vae512-TAG (e.g. sdxl for Sigma's VAE)"}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", check_include(self.include))
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.field == DEFAULT_SET:  # the default caption set is the historical "caption" field (same hash)
            object.__setattr__(self, "field", "caption")
        if self.field not in FIELDS:
            try:
                check_set_name(self.field)  # a named caption set
            except ConfigError as exc:
                raise ConfigError(f"field must be caption, original or a caption set's name: {exc}") from None
        if self.vae_tag is not None and not self.vae_tag.isalnum():
            raise ConfigError(f"vae_tag must be letters and digits, got {self.vae_tag!r}")
        bad = [r for r in self.resolutions if r not in BASES]
        if bad or not self.resolutions:
            raise ConfigError(f"resolutions must be among {BASES} (PixArt's bucket bases), got {self.resolutions}")
        if self.max_length < 1:
            raise ConfigError("max_length must be at least 1")

    def kinds(self) -> list[FeatureKind]:
        """One of each kind in `KINDS` for this config (nothing loaded)."""
        return [kind(self) for kind in KINDS]

    def sidecars(self) -> dict[str, dict[str, Any]]:
        """{sidecar folder name: its semantics}; batch sizes and device do not change what is written."""
        return {name: sem for kind in self.kinds() for name, sem in kind.sidecars().items()}

    def semantics(self) -> dict[str, Any]:
        return self.sidecars()


class FeaturesStage(Stage):
    name = "features"
    help = "images/ and a caption set -> T5 text features and VAE latents in sidecar shards"
    config_type = FeaturesConfig

    def needs(self) -> list[Needs]:
        return [needs_images(self.layout)]

    def preflight(self) -> None:
        check_model(self.config.t5, "--t5")
        check_model(self.config.vae, "--vae")

    def check(self) -> None:
        """Refuse an output without images; each kind refuses what cannot work (a caption set lacking shards)."""
        super().check()
        shards = self.layout.images.done_shards()
        for kind in self.config.kinds():
            kind.check(self.layout, shards)

    def passes(self, ctx: RunContext) -> Iterator[Pass]:
        """One pass over every done images shard; a shard's current sidecars are kept (resumable, incremental)."""
        view = self.input_view(self.layout.images)
        folder = FeatureDirs(self.layout, self.config, view)
        yield Pass(
            label="features",
            folder=folder,
            make_worker=functools.partial(FeaturesWorker, self.layout, self.config, view),
            tasks=[(shard, None) for shard in self.layout.images.done_shards()],
            semantics=self.config.semantics(),
            # "auto": one GPU per worker where the cluster has GPUs, CPU workers where it has none (laptops, CI).
            resources=Resources.for_device(self.config.device),
            upstream=folder.input,  # the images shards' lineage, dedup included; a kind's inputs join per sidecar
        )

    def outputs(self) -> list[str]:
        return [f"features: {self.layout.features}/"]


class FeaturesWorker:
    """Loads every kind's model once per worker; `process` writes a shard's sidecars that are not current."""

    def __init__(self, layout: Layout, config: FeaturesConfig, view: InputView | None = None) -> None:
        self.layout, self.config = layout, config
        # The stage gives its view; tests that build a worker alone get the same one.
        self.dirs = FeatureDirs(layout, config, view or FeaturesStage(layout, config).input_view(layout.images))

    def setup(self) -> None:
        for kind in self.dirs.kinds:
            kind.setup()

    def process(self, shard: str, _payload: Any = None, rows_done: RowsDone = no_progress) -> DoneMarker:
        started = time.time()
        todo = [name for name in self.dirs.dirs if not self.dirs.current(name, shard)]
        samples = table_to_samples(self.dirs.images.read_index(shard))
        self.dirs.input.skip(shard, samples)  # samples a filter removes (dedup) become skipped rows in every sidecar
        job = ShardJob(shard, samples, self.dirs)
        kinds = [(kind, names) for kind in self.dirs.kinds if (names := [n for n in kind.sidecars() if n in todo])]
        rows_done(0, len(samples))
        for i, (kind, names) in enumerate(kinds, 1):
            kind.write(job, names)
            rows_done(len(samples) * i // len(kinds), len(samples))  # each kind goes through every sample
        done = self.dirs.read_done(shard)
        done.seconds = round(time.time() - started, 3)
        done.extra["sidecars_written"] = todo
        return done


def run_features(output: str, config: FeaturesConfig, **kw: Any) -> StageRun:
    """`curation features` from Python: see `curation.runner.run` for the keywords."""
    from curation.runner import run

    return run(FeaturesStage(Layout(output), config), **kw)
