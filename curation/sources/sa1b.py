"""SA-1B: tars or folders of `sa_<id>.jpg` + `sa_<id>.json`.

The json's `image` object (`image_id`, `width`, `height`, `file_name`) is kept as source metadata; its
`annotations` (segmentation masks, most of the json's bytes) are never loaded into the index.
"""

from __future__ import annotations

from curation.sources.base import Member, SourceItem, check_unique, image_ext, list_tar, open_input


def list_sa1b(input_url: str) -> list[SourceItem]:
    fs, root, protocol = open_input(input_url)
    files = [root] if fs.isfile(root) else sorted(fs.find(root))
    entries: list[tuple[str, Member]] = []
    for f in files:
        if f.endswith((".tar", ".tgz", ".tar.gz")):
            entries.extend(list_tar(protocol + f))
        else:
            entries.append((f, Member(protocol + f)))
    jsons = {name.rsplit("/", 1)[-1][: -len(".json")]: m for name, m in entries if name.endswith(".json")}
    items = []
    for name, member in entries:
        ext = image_ext(name)
        stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if ext is None or not stem.startswith("sa_"):
            continue
        items.append(
            SourceItem(
                key=stem,
                source="sa1b",
                source_id=stem.removeprefix("sa_"),  # replaced by the json's image_id when present
                ext=ext,
                image=member,
                meta=jsons.get(stem),
            )
        )
    check_unique(items)
    return items


def sa1b_meta(meta: dict) -> tuple[str | None, dict]:
    """(source id, kept metadata) from an SA-1B json: the `image` object only."""
    image = meta.get("image")
    if not isinstance(image, dict):  # a malformed sidecar: keep the sample, drop the metadata
        return None, {"meta_error": "the json has no `image` object"}
    source_id = str(image["image_id"]) if "image_id" in image else None
    return source_id, {k: image[k] for k in ("image_id", "width", "height", "file_name") if k in image}
