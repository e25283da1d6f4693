"""A folder of images (any Pillow format) with optional same-name `.txt` captions.

Key: the relative path stem, made safe (`a/b.jpg` -> `a__b`). Files that share a stem (`x.jpg`, `x.png`) keep
both, keyed `x_jpg` and `x_png`, rather than refusing a whole dataset for a common habit.
"""

from __future__ import annotations

from collections import Counter

from curation.records import safe_key
from curation.sources.base import Member, SourceItem, check_unique, image_ext, open_input


def list_folder(input_url: str) -> list[SourceItem]:
    fs, root, protocol = open_input(input_url)
    root = root.rstrip("/")
    files = sorted(fs.find(root))
    texts = {f[: -len(".txt")] for f in files if f.endswith(".txt")}
    images = [f for f in files if image_ext(f) is not None]
    stems = Counter(f.rsplit(".", 1)[0] for f in images)
    items = []
    for f in images:
        ext = image_ext(f)
        rel = f[len(root) + 1 :]
        stem = f.rsplit(".", 1)[0]
        caption = Member(protocol + stem + ".txt") if stem in texts else None
        rel_stem = rel.rsplit(".", 1)[0]
        items.append(
            SourceItem(
                key=safe_key(rel_stem if stems[stem] == 1 else f"{rel_stem}_{ext}"),
                source="folder",
                source_id=rel,
                ext=ext,
                image=Member(protocol + f),
                caption=caption,
            )
        )
    check_unique(items)
    return items
