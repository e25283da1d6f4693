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


def make_img2dataset(root: Path, images: list[Path], captions: list[str], failed: int = 2) -> Path:
    """img2dataset output: 00000.tar (<key>.jpg/.txt/.json), 00000.parquet (incl. failed downloads), stats json."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i, (src, caption) in enumerate(zip(images, captions, strict=True)):
            key = f"00000{i:04d}"
            w, h = _size(src)
            url = f"https://example.org/img/{i}.jpg"
            meta = {"url": url, "caption": caption, "key": key, "status": "success", "error_message": None,
                    "width": w, "height": h, "original_width": w, "original_height": h}  # fmt: skip
            _add(tar, f"{key}.jpg", src.read_bytes())
            _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            rows.append({"url": url, "caption": caption, "key": key, "status": "success", "error_message": None})
    for j in range(failed):
        key = f"00000{len(images) + j:04d}"
        rows.append({"url": f"https://example.org/gone/{j}.jpg", "caption": "gone", "key": key,
                     "status": "failed_to_download", "error_message": "HTTP Error 404: Not Found"})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), root / "00000.parquet")
    (root / "00000_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(images)}))
    return root


def make_journeydb(root: Path, images: list[Path], missing: int = 1) -> Path:
    """JourneyDB: imgs/000.tgz holding 000/<id>.jpg, and an annotation JSONL (one more line than images if missing)."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    lines = []
    with tarfile.open(root / "imgs" / "000.tgz", "w:gz") as tar:
        for i, src in enumerate(images):
            jid = f"{i:04x}deadbeef"
            _add(tar, f"000/{jid}.jpg", src.read_bytes())
            lines.append({"img_path": f"./000/{jid}.jpg", "prompt": f"a photo number {i} --ar 3:2 --v 5",
                          "Task2": {"Caption": f"A caption of photo {i}."}})  # fmt: skip
    for j in range(missing):
        lines.append({"img_path": f"./000/{j:04x}missing.jpg", "prompt": "lost", "Task2": {"Caption": "lost"}})
    (root / "annotation.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root
