"""JourneyDB: image folders or `.tgz` archives plus JSONL annotations.

Each annotation line holds `img_path` (e.g. `./000/<id>.jpg`), `prompt` (the Midjourney prompt, kept as the
original caption) and `Task2.Caption`. Images are matched to annotations by file name (JourneyDB ids are unique).
An annotation whose image is absent is kept as a failed sample.
"""

from __future__ import annotations

import json

from curation.records import safe_key
from curation.sources.base import Member, SourceError, SourceItem, check_unique, image_ext, list_tar, open_input


def list_journeydb(input_url: str) -> list[SourceItem]:
    fs, root, protocol = open_input(input_url)
    files = sorted(fs.find(root))
    annotations = [f for f in files if f.endswith(".jsonl")]
    if not annotations:
        raise SourceError(f"no JourneyDB annotation file (*.jsonl) under {input_url}")
    images: dict[str, Member] = {}
    for f in files:
        found = list_tar(protocol + f) if f.endswith((".tgz", ".tar.gz", ".tar")) else [(f, Member(protocol + f))]
        for name, member in found:
            if image_ext(name) is None:
                continue
            base = name.rsplit("/", 1)[-1]
            if base in images:
                raise SourceError(f"image {base!r} appears twice: {images[base]} and {member}")
            images[base] = member
    items = []
    for ann in annotations:
        with fs.open(ann, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    img_path = record["img_path"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise SourceError(f"{ann}:{lineno}: not a JourneyDB annotation line ({exc})") from exc
                if not isinstance(img_path, str):
                    raise SourceError(f"{ann}:{lineno}: img_path must be a string, got {img_path!r}")
                prompt = record.get("prompt")
                base = img_path.rsplit("/", 1)[-1]
                member = images.get(base)
                task2 = record.get("Task2") or {}
                items.append(
                    SourceItem(
                        key=safe_key(base.rsplit(".", 1)[0]),
                        source="journeydb",
                        source_id=img_path,
                        ext=image_ext(base) or "",
                        image=member,
                        original_caption=prompt if prompt is None else str(prompt),
                        source_meta={"task2_caption": task2.get("Caption")} if isinstance(task2, dict) else None,
                        unavailable=None if member else f"image {img_path} not found under {input_url}",
                    )
                )
    check_unique(items)
    return items
