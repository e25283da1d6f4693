"""`curation browse` without a browser: what ingest and stats record for it, the index's queries, the routes' HTTP
answers (404, read-only, headers), thumbnails with and without member offsets, and an s3:// output."""

from __future__ import annotations

import io
import shutil
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.browse.index import OutputIndex
from curation.shards import StageDir
from curation.stats.nouns import reference_nouns
from tests.browse.conftest import HOSTILE_CAPTION
from tests.outputs import index_rows, tar_members

# The package's output is built by the first test that asks for it (two caption sets by tiny LLaVA on Ray:
# about a minute on a quiet 2-core machine, many more beside other jobs).
pytestmark = pytest.mark.timeout(1800)

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the tests' http_proxy is a dead end


def _get(url: str, **kw) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, **kw)
    try:
        with _DIRECT.open(request, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_images_index_points_at_each_image_member(browse_output):
    images = StageDir(str(browse_output / "images"))
    members = tar_members(browse_output, "images")
    rows = index_rows(browse_output, "images")
    assert {k for k, r in rows.items() if r["status"] == "ok"} == set(members)
    for shard in images.done_shards():
        data = (browse_output / "images" / f"{shard}.tar").read_bytes()
        for r in images.read_index(shard).to_pylist():
            if r["status"] != "ok":
                assert r["member_offset"] is None and r["member_size"] is None
                continue
            start, size = r["member_offset"], r["member_size"]
            assert data[start : start + size] == members[r["key"]][r["ext"]], r["key"]


def test_stats_writes_each_captions_nouns(browse_output):
    """Per sample, in each stats folder: the nouns of that set's caption (of the original, in stats-original/)."""
    images = index_rows(browse_output, "images")
    dedup = index_rows(browse_output, "dedup")
    originals = index_rows(browse_output, "stats-original")
    counted = {k for k, r in images.items() if r["status"] == "ok" and dedup[k]["keep"]}
    assert set(originals) == counted and counted
    for key, row in originals.items():
        assert row["nouns"] == len(reference_nouns(images[key]["original_caption"] or "")), key
    for caption_set, folder in (("default", "stats"), ("alttext", "stats-alttext")):
        captions = index_rows(browse_output, "captions" if caption_set == "default" else f"captions-{caption_set}")
        nouns = index_rows(browse_output, folder)
        assert set(nouns) == {k for k, r in captions.items() if r["status"] == "ok"} != set(), caption_set
        assert all(r["nouns"] == len(reference_nouns(captions[k]["caption"])) for k, r in nouns.items())


def test_queries_match_the_indexes(browse_output):
    index = OutputIndex(str(browse_output))
    rows = index_rows(browse_output, "images")
    every = index.page(index.from_params({}))
    assert every.total == len(rows) and [r["key"] for r in every.rows] == sorted(rows)
    failed = index.page(index.from_params({"status": "failed"}))
    assert {r["key"] for r in failed.rows} == {k for k, r in rows.items() if r["status"] == "failed"} != set()
    alttext = index_rows(browse_output, "captions-alttext")
    at_stage = index.page(index.from_params({"stage": "alttext", "status": "failed", "reason": "no_original"}))
    assert {r["key"] for r in at_stage.rows} == {k for k, r in alttext.items() if r["error_reason"] == "no_original"}
    # Filters on two views at once: the images index's bucket and a caption set's status.
    bucket = rows["hostile"]["bucket_1024"]
    both = index.page(index.from_params({"bucket": bucket, "stage": "alttext", "status": "ok"}))
    assert (
        {r["key"] for r in both.rows}
        == {k for k, r in alttext.items() if r["status"] == "ok" and rows[k]["bucket_1024"] == bucket}
        != set()
    )
    # Search: a word of one original caption, as a phrase and as a regex; markup is plain text to search.
    hit = index.page(index.from_params({"set": "original", "q": "<SCRIPT>alert(1)"}))
    assert [r["key"] for r in hit.rows] == ["hostile"]
    regex = index.page(index.from_params({"set": "original", "q": r"onerror=\"alert\(2\)", "mode": "regex"}))
    assert [r["key"] for r in regex.rows] == ["hostile"]
    assert index.page(index.from_params({"set": "original", "q": "100%_"})).total == 0  # % and _ are literal
    # Dedup group size, a score range, sorting by nouns of a set.
    groups = index.page(index.from_params({"min_group_size": "2"}))
    assert sorted(r["key"] for r in groups.rows) == sorted(["copy_of_first", min(k for k in rows if k[0] == "0")])
    quality = {k: r["aesthetic"] for k, r in index_rows(browse_output, "quality").items()}
    ranged = index.page(index.from_params({"min_aesthetic": "2.5", "max_aesthetic": "7.5"}))
    assert {r["key"] for r in ranged.rows} == {k for k, v in quality.items() if 2.5 <= v <= 7.5}
    nouns = index_rows(browse_output, "stats-alttext")
    by_nouns = index.page(index.from_params({"set": "alttext", "sort": "nouns", "order": "desc"}))
    shown = [nouns[r["key"]]["nouns"] for r in by_nouns.rows if r["key"] in nouns]
    assert shown == sorted(shown, reverse=True) and len(shown) == len(nouns)
    assert all(r["key"] not in nouns for r in by_nouns.rows[len(shown) :])  # uncounted rows last
    # Pages of 4: the first pages come from the stats view alone, the last from the join; the same order either way.
    paged = OutputIndex(str(browse_output), page_size=4)
    query = {"set": "alttext", "sort": "nouns", "order": "desc"}
    pages = [paged.page(paged.from_params(query | {"page": str(p)})) for p in range(1, -(-len(rows) // 4) + 1)]
    assert [r["key"] for p in pages for r in p.rows] == [r["key"] for r in by_nouns.rows]
    assert pages[0].rows[0]["member_offset"] == rows[pages[0].rows[0]["key"]]["member_offset"]


def test_routes_answer_only_for_keys_in_the_index(browse_server):
    status, body, headers = _get(f"{browse_server}/")
    assert status == 200 and "script-src" not in headers["content-security-policy"]
    assert "default-src 'none'" in headers["content-security-policy"]
    for key in ["nope", "..%2F..%2Fimages%2F", "%2E%2E", "hostile.jpg", "hostile%00"]:
        assert _get(f"{browse_server}/sample/{key}")[0] == 404, key
        assert _get(f"{browse_server}/thumb/{key}")[0] == 404, key
    assert _get(f"{browse_server}/sample/hostile", method="POST")[0] == 405  # nothing writes
    assert _get(f"{browse_server}/", headers={"Host": "attacker.example"})[0] == 400  # DNS rebinding
    assert _get(f"{browse_server}/?q=(&mode=regex")[0] == 400  # an invalid regular expression, said so
    status, body, headers = _get(f"{browse_server}/sample/hostile")  # its nouns are marked: "<", "script", ...
    assert status == 200 and b"<script" not in body and b"<img src=x" not in body and b"&#34;alert" in body
    status, body, headers = _get(f"{browse_server}/?set=original&q=onerror")  # the card's caption, unmarked
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in body and b"<script" not in body
    status, body, headers = _get(f"{browse_server}/thumb/hostile")
    assert status == 200 and headers["content-type"] == "image/jpeg" and max(Image.open(io.BytesIO(body)).size) == 256


def test_thumbnails_of_failed_and_undecodable_images(browse_server, browse_output):
    rows = index_rows(browse_output, "images")
    failed = next(k for k, r in rows.items() if r["status"] == "failed")
    assert _get(f"{browse_server}/thumb/{failed}")[0] == 404  # failed at ingest: no image kept
    # Its header reads (ingest keeps it), its pixels do not: an error status, with a picture saying why.
    status, body, headers = _get(f"{browse_server}/thumb/edge_truncated_shortfile")
    assert rows["edge_truncated_shortfile"]["status"] == "ok" and status == 422
    assert Image.open(io.BytesIO(body)).format == "JPEG"


def test_thumbnails_without_member_offsets(browse_output, tmp_path):
    """An output ingested before offsets were recorded: the one tar is scanned for the member."""
    old = tmp_path / "old"
    shutil.copytree(browse_output, old)
    for path in (old / "images").glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["member_offset", "member_size"]), path)
    from curation.browse.thumbs import Thumbnails

    index = OutputIndex(str(old))
    where = index.locate("hostile")
    assert where.offset is None
    image = Image.open(io.BytesIO(Thumbnails(index.layout.images).get("hostile", where, "small")))
    assert max(image.size) == 256 and index.page(index.from_params({})).total == len(index_rows(old, "images"))


def test_browse_an_s3_output(browse_output, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("out")
    fs.put(str(browse_output) + "/", "out/", recursive=True)
    index = OutputIndex("s3://out")
    assert index.page(index.from_params({"status": "failed"})).total == sum(
        r["status"] == "failed" for r in index_rows(browse_output, "images").values()
    )
    from curation.browse.thumbs import Thumbnails

    where = index.locate("hostile")
    data = Thumbnails(index.layout.images).get("hostile", where, "large")
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    assert index.row("images", "hostile")["original_caption"] == HOSTILE_CAPTION


def test_browse_refuses_what_it_cannot_serve(tmp_path, capsys):
    from curation.cli import main

    assert main(["browse", "--output", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["browse", "--output", str(tmp_path / "empty")]) == 2
    assert "run curation ingest first" in capsys.readouterr().err


def test_browse_refuses_a_port_in_use(browse_output, capsys):
    import socket

    from curation.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["browse", "--output", str(browse_output), "--port", str(s.getsockname()[1])]) == 2
    assert "choose another --port" in capsys.readouterr().err


def test_the_static_report_summarises_every_stage_and_shows_every_sample(browse_output):
    """`stats` wrote OUT/report/ last in the fixture: a small output's gallery holds every sample, failed ones too."""
    from curation.layout import Layout
    from curation.stats.overview import sample_gallery, stage_counts

    rows = index_rows(browse_output, "images")
    page = (browse_output / "report" / "index.html").read_text(encoding="utf-8")
    assert 'href="duplicates.html"' in page and (browse_output / "report" / "duplicates.html").exists()
    assert f"gallery ({len(rows)})" in page and len(list((browse_output / "report" / "gallery").glob("*.jpg"))) > 0
    assert page.count('<div class="item') == len(rows)
    counts = {c.label: c for c in stage_counts(Layout(str(browse_output)))}
    assert set(counts) >= {
        "images",
        "dedup",
        "captions",
        "captions-alttext",
        "stats",
        "stats-alttext",
        "stats-original",
    }
    failed = sum(r["status"] == "failed" for r in rows.values())
    assert counts["images"].rows == len(rows) and counts["images"].counts["by_status"]["failed"] == failed
    assert counts["captions"].counts["by_skipped"] == {"duplicate": 1}
    # A larger output than the limit: a sample spread over (status, bucket) strata, every status kept.
    few = sample_gallery(Layout(str(browse_output)), limit=6)
    assert len(few) == 6 and {i["status"] for i in few} == {"ok", "failed", "skipped"}
    assert few == sample_gallery(Layout(str(browse_output)), limit=6)  # the same output, the same gallery
