"""The report folder: Table 1 in markdown and JSON, valid PNG plots, an HTML page that escapes all text."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from curation.stats.nouns import NounStats, count_captions
from curation.stats.report import PAPER_ROWS, table1_cells, write_report

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
COCO_CAPTIONS = SHARED / "data" / "captions" / "coco_val2017_5005.jsonl"
ROW_KEYS = {"name", "images", "vn", "dn", "vn_dn_pct", "total_nouns", "nouns_per_image"}
PLOTS = ["noun_rank_frequency.png", "nouns_per_image.png", "top_nouns.png"]


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stats() -> dict[str, NounStats]:
    with COCO_CAPTIONS.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:400]
    by_image: dict[int, list[str]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row["caption"])
    # The same images twice: one short caption each vs all their captions as one paragraph.
    return {
        "original": count_captions([caps[0] for caps in by_image.values()]),
        "caption": count_captions([" ".join(caps) for caps in by_image.values()]),
    }


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_report_writes_tables_plots_and_gallery(tmp_path, stats):
    from curation.stats.overview import StageCounts

    gallery = [
        {
            "key": "sa_1<b>&",
            "status": "ok",
            "reason": None,
            "bucket": "1.0",
            "thumbnail": _jpeg((200, 30, 30)),
            "captions": {"default": ("<script>alert('x')</script> A dog & a cat.", "ok")},
            "original": 'a "quoted" <i>original</i>',
        },
        {"key": "blank", "status": "failed", "reason": "truncated<", "bucket": None, "thumbnail": b"",
         "captions": {}, "original": None},
    ]  # fmt: skip
    stages = [
        StageCounts("images", 2, 20, {"by_status": {"ok": 18, "failed": 2}, "by_reason": {"truncated<": 2}}),
        StageCounts("captions", 2, 20, {"by_status": {"ok": 17}, "by_skipped": {"duplicate": 1},
                                        "by_caption_status": {"ok": 16, "empty": 1}}),
    ]  # fmt: skip
    buckets = {"1.0": 12, "0.57": 3, "1.75": 2}
    index = write_report(
        tmp_path / "report", stats, bucket_counts=buckets, gallery=gallery, stages=stages, output="o<u>t",
        duplicates=True,
    )  # fmt: skip
    report = tmp_path / "report"
    assert index == report / "index.html"

    rows = json.loads((report / "table1.json").read_text(encoding="utf-8"))
    assert [r["name"] for r in rows] == ["original", "caption"]
    assert all(set(r) == ROW_KEYS for r in rows)
    assert rows == [s.table1_row(name) for name, s in stats.items()]
    original, caption = rows
    assert original["images"] == caption["images"] == 80
    assert caption["nouns_per_image"] > 3 * original["nouns_per_image"]  # five captions say more than one

    for name in [*PLOTS, "aspect_buckets.png"]:
        with Image.open(report / name) as im:
            assert im.format == "PNG"
            im.verify()
    assert Image.open(report / "gallery" / "0000.jpg").format == "JPEG"
    assert not (report / "gallery" / "0001.jpg").exists()

    md = (report / "table1.md").read_text(encoding="utf-8")
    ours, paper = md.split("## published in the PixArt-α paper")
    assert "| original |" in ours and "| caption |" in ours
    for cells in (table1_cells(r) for r in rows):
        assert cells["VN/DN"] in ours
    assert "85K/646K = 13.3%" in paper and "233.9M" in paper and "20.9/Img" in paper

    page = index.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "sa_1&lt;b&gt;&amp;" in page and "<i>original</i>" not in page
    for name in [*PLOTS, "aspect_buckets.png", "gallery/0000.jpg"]:
        assert f'src="{name}"' in page
    # Every stage's counts, the failed sample's reason in the gallery, links to the other pages.
    assert "failed 2" in page and "truncated&lt; 2" in page and "duplicate 1" in page and "empty 1" in page
    assert '<div class="noimage">truncated&lt;</div>' in page
    assert 'href="duplicates.html"' in page and 'href="table1.md"' in page
    assert "curation browse --output o&lt;u&gt;t" in page


def test_report_without_buckets_or_data(tmp_path):
    index = write_report(tmp_path, {"empty": NounStats(), "blank": count_captions([None, ""])})
    rows = json.loads((tmp_path / "table1.json").read_text(encoding="utf-8"))
    assert [(r["name"], r["images"], r["dn"], r["nouns_per_image"]) for r in rows] == [
        ("empty", 0, 0, 0.0),
        ("blank", 2, 0, 0.0),
    ]
    for name in PLOTS:
        with Image.open(tmp_path / name) as im:
            im.verify()
    assert not (tmp_path / "aspect_buckets.png").exists()
    assert "aspect_buckets.png" not in index.read_text(encoding="utf-8")


def test_paper_rows_print_as_published():
    printed = [table1_cells(r) for r in PAPER_ROWS]
    assert [(c["Dataset"], c["VN/DN"], c["Total Noun"], c["Average"]) for c in printed] == [
        ("LAION", "210K/2461K = 8.5%", "72.0M", "6.4/Img"),
        ("LAION-LLaVA", "85K/646K = 13.3%", "233.9M", "20.9/Img"),
        ("SAM-LLaVA", "23K/124K = 18.6%", "327.9M", "29.3/Img"),
        ("Internal", "152K/582K = 26.1%", "136.6M", "12.2/Img"),
    ]
    assert all(set(r) == ROW_KEYS for r in PAPER_ROWS)
