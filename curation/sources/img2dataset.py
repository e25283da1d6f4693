"""LAION as img2dataset writes it: `NNNNN.tar` (`<key>.jpg`, `<key>.txt`, `<key>.json`) beside `NNNNN.parquet`.

Keys are img2dataset's 9 digits (5 shard + 4 index). The alt-text is the original caption; the url is the source id.
Rows of `NNNNN.parquet` whose download failed are kept as failed samples, so the index accounts for every url.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from curation.sources.base import SourceItem, check_unique, image_ext, list_tar, open_input


def list_img2dataset(input_url: str) -> list[SourceItem]:
    fs, root, protocol = open_input(input_url)
    tars = sorted(f for f in fs.find(root) if f.endswith(".tar"))
    items = []
    for tar in tars:
        members = list_tar(protocol + tar)
        by_name = dict(members)
        for name, member in members:
            ext = image_ext(name)
            if ext is None:
                continue
            stem = name.rsplit(".", 1)[0]
            items.append(
                SourceItem(
                    key=stem.rsplit("/", 1)[-1],
                    source="img2dataset",
                    source_id=stem.rsplit("/", 1)[-1],  # replaced by the url from the json
                    ext=ext,
                    image=member,
                    caption=by_name.get(stem + ".txt"),
                    meta=by_name.get(stem + ".json"),
                )
            )
        items.extend(_failed_downloads(fs, protocol, tar[: -len(".tar")] + ".parquet", {i.key for i in items}))
    check_unique(items)
    return items


def _failed_downloads(fs, protocol: str, parquet: str, present: set[str]) -> list[SourceItem]:
    if not fs.exists(parquet):
        return []
    with fs.open(parquet, "rb") as f:
        table = pq.read_table(f)
    if "status" not in table.column_names or "key" not in table.column_names:
        return []
    out = []
    for row in table.to_pylist():
        if row["status"] == "success" or row["key"] in present:
            continue
        out.append(
            SourceItem(
                key=str(row["key"]),
                source="img2dataset",
                source_id=str(row.get("url") or row["key"]),
                ext="",
                image=None,
                original_caption=row.get("caption"),
                unavailable=str(row.get("error_message") or row["status"]),
            )
        )
    return out
