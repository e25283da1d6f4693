"""Build small inputs in each upstream layout (folder, SA-1B, img2dataset, JourneyDB) from real images."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def make_folder(root: Path, images: list[Path], captions: dict[str, str] | None = None, nested: bool = True) -> Path:
    """Images copied under root (a sub-folder for every third one unless not `nested`), optional .txt captions."""
    root.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(images):
        dst = root / ("sub" if nested and i % 3 == 0 else "") / src.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(src, dst)
        if captions and src.name in captions:
            dst.with_suffix(".txt").write_text(captions[src.name])
    return root


def make_sa1b(root: Path, images: list[Path], first_id: int = 1) -> Path:
    """An SA-1B style tar: sa_<id>.jpg + sa_<id>.json (image object and a dummy annotation)."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "sa_000000.tar", "w") as tar:
        for i, src in enumerate(images):
            sid = first_id + i
            w, h = _size(src)
            meta = {
                "image": {"image_id": sid, "width": w, "height": h, "file_name": f"sa_{sid}.jpg"},
                "annotations": [{"id": 1, "segmentation": {"size": [h, w], "counts": "xyz"}}],
            }
            _add(tar, f"sa_{sid}.jpg", src.read_bytes())
            _add(tar, f"sa_{sid}.json", json.dumps(meta).encode())
    return root


def make_img2dataset(
    root: Path,
    images: list[Path],
    captions: list[str | None],
    failed: int = 2,
    fmt: str = "webdataset",
    shard: int = 0,
) -> Path:
    """img2dataset output as its writers lay it out, in one of its output formats (`shard` 00000 by default):

    webdataset: 00000.tar (<key>.jpg/.txt/.json) + 00000.parquet; files: 00000/ (the same files) + 00000.parquet;
    parquet: 00000.parquet alone, the bytes in its `jpg` column (null for failed rows). Every format also writes
    00000_stats.json. Failed rows alternate between a failed download and a failed resize; a None caption is
    written as img2dataset does: "" in the .txt, null in the json and parquet.
    """
    root.mkdir(parents=True, exist_ok=True)
    rows, files = [], {}
    for i, (src, caption) in enumerate(zip(images, captions, strict=True)):
        key = f"{shard:05d}{i:04d}"
        w, h = _size(src)
        url = f"https://example.org/img/{i}.jpg"
        meta = {"url": url, "caption": caption, "key": key, "status": "success", "error_message": None,
                "width": w, "height": h, "original_width": w, "original_height": h}  # fmt: skip
        files[key] = {"jpg": src.read_bytes(), "txt": (caption or "").encode(), "json": json.dumps(meta).encode()}
        rows.append(meta)
    for j in range(failed):
        key = f"{shard:05d}{len(images) + j:04d}"
        status, error = (("failed_to_download", "HTTP Error 404: Not Found") if j % 2 == 0
                         else ("failed_to_resize", "image file is truncated"))  # fmt: skip
        rows.append({"url": f"https://example.org/gone/{j}.jpg", "caption": "gone", "key": key, "status": status,
                     "error_message": error, "width": None, "height": None, "original_width": None,
                     "original_height": None})  # fmt: skip
    if fmt == "webdataset":
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for key, members in files.items():
                for ext, data in members.items():
                    _add(tar, f"{key}.{ext}", data)
    elif fmt == "files":
        (root / f"{shard:05d}").mkdir()
        for key, members in files.items():
            for ext, data in members.items():
                (root / f"{shard:05d}" / f"{key}.{ext}").write_bytes(data)
    else:
        assert fmt == "parquet", fmt
        for row in rows:
            row["jpg"] = files[row["key"]]["jpg"] if row["key"] in files else None
    # img2dataset writes its parquet 100 rows at a time, so a shard's file holds many row groups: 2 here.
    pq.write_table(pa.Table.from_pylist(rows), root / f"{shard:05d}.parquet", row_group_size=2)
    (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(images)}))
    return root


def make_journeydb(
    root: Path,
    images: list[Path],
    missing: int = 1,
    annotations: str = "jsonl",
    absent: dict[str, int] | None = None,
    extracted_images: bool = False,
) -> Path:
    """JourneyDB: imgs/000.tgz holding 000/<id>.jpg (`extracted_images`: the folder imgs/000/ as `tar xzf` leaves
    it), and the annotation file (`annotation.jsonl`, the released `annotation.jsonl.tgz`, or "both": the tgz with
    its .jsonl extracted beside it): a line per image, `missing` more for images absent from 000.tgz, and
    `absent[archive]` lines for archives that were not downloaded."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    lines = []
    with tarfile.open(root / "imgs" / "000.tgz", "w:gz") as tar:
        for i, src in enumerate(images):
            jid = f"{i:04x}deadbeef"
            _add(tar, f"000/{jid}.jpg", src.read_bytes())
            lines.append({"img_path": f"./000/{jid}.jpg", "prompt": f"a photo number {i} --ar 3:2 --v 5",
                          "Task2": {"Caption": f"A caption of photo {i}."}})  # fmt: skip
    if extracted_images:
        with tarfile.open(root / "imgs" / "000.tgz") as tar:
            tar.extractall(root / "imgs", filter="data")
        (root / "imgs" / "000.tgz").unlink()
    for j in range(missing):
        lines.append({"img_path": f"./000/{j:04x}missing.jpg", "prompt": "lost", "Task2": {"Caption": "lost"}})
    for archive, n in (absent or {}).items():
        lines += [{"img_path": f"./{archive}/{archive}{j:04x}.jpg", "prompt": "elsewhere"} for j in range(n)]
    text = "".join(json.dumps(x) + "\n" for x in lines).encode()
    if annotations in ("jsonl", "both"):
        (root / "annotation.jsonl").write_bytes(text)
    if annotations in ("jsonl.tgz", "both"):
        with tarfile.open(root / "annotation.jsonl.tgz", "w:gz") as tar:
            _add(tar, "annotation.jsonl", text)
    return root
