"""Train straight from the feature shards: a map-style Dataset and an aspect-ratio batch sampler.

Standalone on purpose (torch, numpy and the standard library only): copy it into a trainer. Local shards.

    ds = FeatureDataset("OUT/features", vae="vae512ms", captions="OUT/captions")
    ds = FeatureDataset.from_output("OUT", vae="vae512ms", caption_set="default")   # the same, with curation
    loader = DataLoader(ds, batch_sampler=AspectRatioBatchSampler(ds.buckets, batch_size=32), num_workers=8)

An item, as PixArt's InternalData(MS) gives it: `latent` (C, h/8, w/8) = mean + std * eps with a fresh
eps on every read, `t5` (L, D) float32, `mask` (L,) int64, `data_info` with `img_hw` (original h, w for
multi-scale; R, R for single scale) and `aspect_ratio` (the bucket's h/w; 1.0 for single scale), `key`, and
`caption` when caption shards are given. The index holds only tar offsets: members are read by seek.

Any caption set's features: `t5` names its T5 sidecar (`t5`, `t5-<set>-<L>`, `t5-original-300`; see
curation/features/text.py). With `second_t5`, each read draws `t5` with probability `real_prompt_ratio`, else
`second_t5`, as PixArt-Σ draws `prompt` or `sharegpt4v` (`text_source` says which); the draw uses the `random`
module, which PyTorch seeds per DataLoader worker.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

_Member = tuple[str, int, int]  # (tar path, data offset, size)


def _done_shards(folder: Path) -> set[str]:
    return {p.name.removesuffix(".done.json") for p in folder.glob("*.done.json") if not p.name.startswith(".")}


def _scan(tar_path: Path, wanted: Sequence[str]) -> dict[str, dict[str, _Member]]:
    """{key: {ext: member}} from the tar's headers only (no member data is read)."""
    out: dict[str, dict[str, _Member]] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if info.isfile() and ext in wanted:
                out.setdefault(key, {})[ext] = (str(tar_path), info.offset_data, info.size)
    return out


def _read(member: _Member) -> bytes:
    path, offset, size = member
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _npy(member: _Member) -> np.ndarray:
    return np.load(io.BytesIO(_read(member)), allow_pickle=False)


class FeatureDataset(Dataset):
    """Samples in both the T5 and the VAE sidecar (and the captions, when given) of every done shard.

    Entries taller than `max_ratio` (h/w of the original) are left out, as PixArt-alpha's trainer does (4.0).
    """

    def __init__(
        self,
        features: str | os.PathLike[str],
        vae: str,
        *,
        t5: str = "t5",
        captions: str | os.PathLike[str] | None = None,
        max_ratio: float | None = 4.0,
        second_t5: str | None = None,
        real_prompt_ratio: float = 1.0,
    ) -> None:
        root = Path(features)
        self._load(lambda name: root / name, vae, t5, captions, max_ratio, second_t5, real_prompt_ratio)

    @classmethod
    def from_output(
        cls,
        output: str | os.PathLike[str],
        vae: str,
        *,
        t5: str = "t5",
        caption_set: str | None = None,
        max_ratio: float | None = 4.0,
        second_t5: str | None = None,
        real_prompt_ratio: float = 1.0,
    ) -> FeatureDataset:
        """The sidecars of a curation output folder (local), found through `curation.layout.Layout`; with
        `caption_set` ("default" or a set's name), each item's caption from that set too. Needs curation installed."""
        from curation.layout import Layout

        layout = Layout(os.fspath(output))
        captions = layout.captions(caption_set).url if caption_set is not None else None
        self = cls.__new__(cls)
        self._load(lambda name: layout.sidecar(name).url, vae, t5, captions, max_ratio, second_t5, real_prompt_ratio)
        return self

    def _load(
        self,
        sidecar: Callable[[str], str | os.PathLike[str]],
        vae: str,
        t5: str,
        captions: str | os.PathLike[str] | None,
        max_ratio: float | None,
        second_t5: str | None,
        real_prompt_ratio: float,
    ) -> None:
        """Index the done shards; `sidecar(name)` is the folder of a sidecar."""
        if not 0.0 <= real_prompt_ratio <= 1.0:
            raise ValueError("real_prompt_ratio must be within [0, 1]")
        t5_dir, vae_dir = Path(sidecar(t5)), Path(sidecar(vae))
        second_dir = Path(sidecar(second_t5)) if second_t5 is not None else None
        self.t5_name, self.second_t5, self.real_prompt_ratio = t5, second_t5, real_prompt_ratio
        shards = _done_shards(t5_dir) & _done_shards(vae_dir)
        if second_dir is not None:
            shards &= _done_shards(second_dir)
        shards = sorted(shards)
        self.members: list[dict[str, _Member]] = []
        self.keys: list[str] = []
        self.meta: list[dict[str, Any]] = []
        for shard in shards:
            text = _scan(t5_dir / f"{shard}.tar", ("t5.npy", "t5mask.npy"))
            second: dict[str, dict[str, _Member]] | None = None
            if second_dir is not None:
                second = _scan(second_dir / f"{shard}.tar", ("t5.npy", "t5mask.npy"))
            image = _scan(vae_dir / f"{shard}.tar", ("vae.npy", "json"))
            caption: dict[str, dict[str, _Member]] | None = None
            if captions is not None:
                caption = _scan(Path(captions) / f"{shard}.tar", ("txt",))
            for key, vae_members in image.items():
                if key not in text or any(d is not None and key not in d for d in (caption, second)):
                    continue  # failed in one sidecar: a row in its index, not a sample
                meta = json.loads(_read(vae_members["json"]))
                if max_ratio is not None and meta["orig_height"] / meta["orig_width"] > max_ratio:
                    continue
                self.keys.append(key)
                drawn = {f"second.{ext}": m for ext, m in (second or {}).get(key, {}).items()}
                self.members.append({**text[key], **vae_members, **(caption or {}).get(key, {}), **drawn})
                self.meta.append(meta)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def buckets(self) -> list[str]:
        """Per item, the group a batch may hold: the bucket key (multi-scale), or the latent's size."""
        return [m["bucket"] or f"{m['height']}x{m['width']}" for m in self.meta]

    def __getitem__(self, index: int) -> dict[str, Any]:
        members, meta = self.members[index], self.meta[index]
        moments = torch.from_numpy(_npy(members["vae.npy"]).astype(np.float32, copy=False))
        mean, std = moments.chunk(2, dim=0)
        latent = mean + std * torch.randn_like(mean)  # a new draw each read, as PixArt's trainer does per epoch
        if meta["multiscale"]:
            img_hw = [meta["orig_height"], meta["orig_width"]]
            aspect = float(meta["bucket"])
        else:
            img_hw, aspect = [meta["height"], meta["width"]], 1.0
        use_second = self.second_t5 is not None and random.random() >= self.real_prompt_ratio
        text = "second." if use_second else ""
        item = {
            "key": self.keys[index],
            "latent": latent,
            "t5": torch.from_numpy(_npy(members[f"{text}t5.npy"]).astype(np.float32)),
            "mask": torch.from_numpy(_npy(members[f"{text}t5mask.npy"]).astype(np.int64)),
            "text_source": self.second_t5 if use_second else self.t5_name,
            "data_info": {
                "img_hw": torch.tensor(img_hw, dtype=torch.float32),
                "aspect_ratio": torch.tensor(aspect, dtype=torch.float32),
            },
        }
        if "txt" in members:
            item["caption"] = _read(members["txt"]).decode("utf-8")
        return item


class AspectRatioBatchSampler(Sampler[list[int]]):
    """Batches of indices from one group each (latents of one shape stack); shuffled per epoch, reproducibly.

    `groups` is the dataset's `buckets`. Call `set_epoch(e)` before each epoch for a new order.
    """

    def __init__(
        self,
        groups: Sequence[str],
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.epoch = 0
        self.by_group: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            self.by_group.setdefault(g, []).append(i)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-{self.epoch}")
        batches = []
        for group in sorted(self.by_group):
            idx = list(self.by_group[group])
            if self.shuffle:
                rng.shuffle(idx)
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(v) // self.batch_size for v in self.by_group.values())
        return sum(-(-len(v) // self.batch_size) for v in self.by_group.values())
