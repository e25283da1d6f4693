import io
import tarfile

import pytest

from curation.layout import Layout
from curation.sources import list_source, local_map, plan_source
from curation.sources.base import SourceError
from curation.sources.listing import read_listing
from tests.layouts import make_folder, make_img2dataset, make_journeydb, make_sa1b


def test_folder_keys_are_safe_relative_stems_with_captions(tmp_path, coco_files):
    root = make_folder(tmp_path / "in", coco_files[:4], captions={coco_files[1].name: "a caption"})
    items = list_source("folder", str(root))
    keys = {i.key for i in items}
    assert f"sub__{coco_files[0].stem}" in keys and coco_files[1].stem in keys
    assert all("." not in k and "/" not in k for k in keys)
    assert sum(i.caption is not None for i in items) == 1


def test_folder_same_stem_keeps_both(tmp_path, coco_files):
    (tmp_path / "x.jpg").write_bytes(coco_files[0].read_bytes())
    (tmp_path / "x.png").write_bytes(coco_files[1].read_bytes())
    assert sorted(i.key for i in list_source("folder", str(tmp_path))) == ["x_jpg", "x_png"]


def test_sa1b_pairs_images_with_json(tmp_path, coco_files):
    items = list_source("sa1b", str(make_sa1b(tmp_path, coco_files[:3], first_id=223750)))
    assert [i.key for i in items] == ["sa_223750", "sa_223751", "sa_223752"]
    assert all(i.meta is not None and i.image.offset is not None for i in items)


def test_img2dataset_keeps_failed_downloads(tmp_path, coco_files):
    root = make_img2dataset(tmp_path, coco_files[:3], ["a", "b", "c"], failed=2)
    items = list_source("img2dataset", str(root))
    assert len(items) == 5
    assert [i.key for i in items if i.image is None] == ["000000003", "000000004"]
    assert all(len(i.key) == 9 for i in items)


def test_journeydb_reads_annotations_and_tgz(tmp_path, coco_files):
    items = list_source("journeydb", str(make_journeydb(tmp_path, coco_files[:2], missing=1)))
    by_key = {i.key: i for i in items}
    assert len(items) == 3
    assert by_key["0000deadbeef"].original_caption.startswith("a photo number 0")
    assert by_key["0000missing"].image is None and "not found" in by_key["0000missing"].unavailable


def test_journeydb_without_annotations_is_a_clear_error(tmp_path, coco_files):
    make_folder(tmp_path, coco_files[:1])
    with pytest.raises(SourceError, match="annotation"):
        list_source("journeydb", str(tmp_path))


def _tar_with(path, names):
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))


@pytest.mark.parametrize("bad", ["../x.jpg", "/etc/x.jpg", "a/../../x.jpg"])
def test_unsafe_member_names_are_refused(tmp_path, bad):
    _tar_with(tmp_path / "00000.tar", ["000000000.jpg", bad])
    with pytest.raises(SourceError, match="unsafe member name") as err:
        list_source("img2dataset", str(tmp_path))
    assert bad in str(err.value)


def test_duplicate_keys_are_refused(tmp_path):
    _tar_with(tmp_path / "sa_a.tar", ["sa_1.jpg"])
    _tar_with(tmp_path / "sa_b.tar", ["sa_1.jpg"])
    with pytest.raises(SourceError, match="duplicate key 'sa_1'"):
        list_source("sa1b", str(tmp_path))


def test_empty_input_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no images"):
        list_source("folder", str(tmp_path))


def test_a_tar_made_with_dot_lists_its_files(tmp_path, coco_files):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "sa_7.jpg").write_bytes(coco_files[0].read_bytes())
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        tar.add(tmp_path / "d", arcname=".")  # what `tar -C d -cf x.tar .` writes: a "." member first
    items = list_source("sa1b", str(tmp_path / "x.tar"))
    assert [i.key for i in items] == ["sa_7"]


def test_unsafe_upstream_keys_are_refused_at_listing(tmp_path):
    _tar_with(tmp_path / "sa.tar", ["sa_1.v2.jpg"])
    with pytest.raises(SourceError, match="unsafe key 'sa_1.v2'"):
        list_source("sa1b", str(tmp_path))


def test_malformed_annotations_are_clear_errors_not_crashes(tmp_path, coco_files):
    import json

    from curation.sources.sa1b import sa1b_meta

    assert sa1b_meta({"image": 5})[0] is None  # a broken sidecar keeps the image, drops the metadata
    (tmp_path / "a.jsonl").write_text(json.dumps({"img_path": 7, "prompt": "x"}) + "\n")
    (tmp_path / "x.jpg").write_bytes(coco_files[0].read_bytes())
    with pytest.raises(SourceError, match="img_path must be a string"):
        list_source("journeydb", str(tmp_path))


# --- img2dataset as its users have it -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["webdataset", "files", "parquet"])
def test_img2dataset_output_formats(tmp_path, coco_files, fmt):
    root = make_img2dataset(tmp_path, coco_files[:3], ["a dog", None, "c"], failed=2, fmt=fmt)
    items = {i.key: i for i in list_source("img2dataset", str(root))}
    assert sorted(items) == [f"00000000{i}" for i in range(5)]
    ok = [items[f"00000000{i}"] for i in range(3)]
    if fmt == "parquet":  # the bytes are a cell of the parquet file; caption and url come with the row
        assert all(i.image.column == "jpg" and i.image.offset == n for n, i in enumerate(ok))
        assert ok[1].original_caption is None and ok[0].source_id == "https://example.org/img/0.jpg"
    else:
        assert all(i.image.member is not None if fmt == "webdataset" else i.image.member is None for i in ok)
        assert all(i.caption is not None and i.meta is not None for i in ok)
    download, resize = items["000000003"], items["000000004"]
    assert (download.unavailable_reason, download.unavailable) == ("failed_to_download", "HTTP Error 404: Not Found")
    assert (resize.unavailable_reason, resize.unavailable) == ("failed_to_resize", "image file is truncated")
    assert download.source_id == "https://example.org/gone/0.jpg" and download.source_meta["url"] == download.source_id


# --- a layout given the wrong --source --------------------------------------------------------------------------


def test_img2dataset_on_sa1b_tars_is_refused(tmp_path, coco_files):
    make_sa1b(tmp_path / "named", coco_files[:2])  # sa_000000.tar: refused by its name, before any task lists it
    with pytest.raises(SourceError, match="use --source sa1b"):
        list_source("img2dataset", str(tmp_path / "named"))
    make_sa1b(tmp_path / "renamed", coco_files[:2])
    (tmp_path / "renamed" / "sa_000000.tar").rename(tmp_path / "renamed" / "00000.tar")  # refused by its members
    with pytest.raises(SourceError, match=r"holds SA-1B files .*use --source sa1b"):
        list_source("img2dataset", str(tmp_path / "renamed"))


def test_sa1b_on_img2dataset_output_is_refused(tmp_path, coco_files):
    make_img2dataset(tmp_path / "i2d", coco_files[:2], ["a", "b"])
    with pytest.raises(SourceError, match="img2dataset output, not SA-1B: use --source img2dataset"):
        list_source("sa1b", str(tmp_path / "i2d"))
    (tmp_path / "i2d" / "00000.parquet").unlink()  # a bare tar of other images: refused by its members
    with pytest.raises(SourceError, match="not SA-1B; for img2dataset output use --source img2dataset"):
        list_source("sa1b", str(tmp_path / "i2d"))


def test_folder_on_webdataset_tars_is_refused(tmp_path, coco_files):
    make_img2dataset(tmp_path, coco_files[:2], ["a", "b"])
    with pytest.raises(SourceError, match="no loose images: .*use --source img2dataset"):
        list_source("folder", str(tmp_path))


def test_journeydb_without_annotations_names_the_folder_source(tmp_path, coco_files):
    make_folder(tmp_path, coco_files[:1])
    with pytest.raises(SourceError, match=r"no JourneyDB annotation file .*use --source folder"):
        list_source("journeydb", str(tmp_path))


# --- JourneyDB as released, partly downloaded -------------------------------------------------------------------


def test_journeydb_annotation_tgz_and_a_partial_download(tmp_path, coco_files):
    root = make_journeydb(tmp_path, coco_files[:2], missing=1, annotations="jsonl.tgz", absent={"001": 3, "002": 2})
    plan = plan_source("journeydb", str(root), Layout(str(tmp_path)).listings, local_map)
    items = {i.key: i for _, listing, _ in plan.units for i in read_listing(listing)}
    # Archives 001 and 002 were never downloaded: 5 annotations counted, not 5 failed rows.
    assert plan.skipped == {"not_downloaded": 5}
    assert sorted(items) == ["0000deadbeef", "0000missing", "0001deadbeef"]
    assert items["0000missing"].image is None and "not found in" in items["0000missing"].unavailable
    assert items["0001deadbeef"].original_caption.startswith("a photo number 1")
    assert [u.id for u, _, _ in plan.units] == ["imgs__000"]


# --- folder: images by content; every other file counted ---------------------------------------------------------


def test_folder_decides_by_content_and_counts_every_other_file(tmp_path, coco_files):
    from PIL import Image

    with Image.open(coco_files[0]) as a, Image.open(coco_files[1]) as b:
        a.save(tmp_path / "stereo.mpo", format="MPO", save_all=True, append_images=[b.resize(a.size)])
        a.save(tmp_path / "moving.apng", format="PNG", save_all=True, append_images=[b.resize(a.size)])
    (tmp_path / "IMG_0001").write_bytes(coco_files[2].read_bytes())  # a camera dump without extensions
    (tmp_path / "IMG_0001.txt").write_text("a caption for a file without an extension")
    (tmp_path / "notes.txt").write_text("no image of that name")
    (tmp_path / "README.md").write_text("# not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    plan = plan_source("folder", str(tmp_path), Layout(str(tmp_path.parent)).listings, local_map)
    items = {i.key: i for _, listing, _ in plan.units for i in read_listing(listing)}
    assert {k: i.ext for k, i in items.items()} == {"stereo": "mpo", "moving": "apng", "IMG_0001": "jpg"}
    assert items["IMG_0001"].caption is not None
    assert plan.skipped == {"not_an_image": 2, "caption_without_image": 1}


# --- keys: unique across source shards, checked in partitioned passes ----------------------------------------------


def test_a_key_clash_across_source_shards_is_found_by_any_pass(tmp_path, monkeypatch):
    import curation.sources

    for n in range(4):
        _tar_with(tmp_path / f"sa_{n:06d}.tar", [f"sa_{100 + n}.jpg", f"sa_{200 + n}.jpg"])
    _tar_with(tmp_path / "sa_000009.tar", ["sa_7.jpg", "sa_202.jpg"])
    monkeypatch.setattr(curation.sources, "KEYS_PER_PASS", 3)  # 10 keys: 4 passes over the listings
    with pytest.raises(SourceError) as err:
        list_source("sa1b", str(tmp_path))
    assert "duplicate key 'sa_202'" in str(err.value)
    assert "sa_000002.tar:sa_202.jpg" in str(err.value) and "sa_000009.tar:sa_202.jpg" in str(err.value)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_header_walk_lists_what_tarfile_lists(tmp_path, coco_files, fmt):
    """Listing reads tar headers itself (ustar, GNU long names, pax records), seeking or streaming: the same members
    as tarfile, at the same offsets."""
    from curation.sources.base import MAX_MEMBER_BYTES, list_tar
    from curation.sources.tar import walk_tar

    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.add(coco_files[0], arcname="sa_1.jpg")
        tar.add(coco_files[1], arcname=f"{'deep/' * 21}sa_2.jpg")  # > 100 characters: ustar prefix, GNU or pax
        tar.add(tmp_path, arcname="a_folder", recursive=False)
        tar.add(coco_files[2], arcname="ü/sa_3.jpg")
    with tarfile.open(path) as tar:
        expected = [(i.name, i.offset_data, i.size) for i in tar if i.isfile()]
    listing = list_tar(str(path))
    assert [(n, m.offset, m.size) for n, m in listing.members] == expected
    assert not listing.damaged and not listing.skipped and not listing.notes
    with open(path, "rb") as f:  # as a remote tar is read: front to back, no seeking
        streamed = walk_tar(f, str(path), end=None, compressed=False, max_size=MAX_MEMBER_BYTES)
    assert streamed.files == expected


def test_a_listing_is_kept_while_its_files_are_unchanged(tmp_path, coco_files):
    """A rerun reuses each unit's listing made from the same files, and lists again what changed."""
    src = tmp_path / "in"
    make_sa1b(src / "a", coco_files[:2], first_id=1)
    make_sa1b(src / "b", coco_files[2:4], first_id=10)
    work = tmp_path / "listings"
    plan_source("sa1b", str(src), Layout(str(tmp_path)).listings, local_map)
    listings = {p.name: p.stat().st_mtime_ns for p in (work / "units").iterdir()}
    make_sa1b(src / "b", coco_files[2:5], first_id=10)  # b's tar rewritten with one more image
    again = plan_source("sa1b", str(src), Layout(str(tmp_path)).listings, local_map)
    assert (work / "units" / "a__sa_000000.parquet").stat().st_mtime_ns == listings["a__sa_000000.parquet"]
    assert (work / "units" / "b__sa_000000.parquet").stat().st_mtime_ns != listings["b__sa_000000.parquet"]
    assert {u.id: n for u, _, n in again.units} == {"a__sa_000000": 2, "b__sa_000000": 3}


def test_a_listing_in_several_row_groups_reads_back_any_slice_exactly(tmp_path, coco_files, monkeypatch):
    """Each output shard of a unit decodes only the row groups of its own rows: the slices must still be exact."""
    import pyarrow.parquet as pq

    import curation.sources.listing as listing

    monkeypatch.setattr(listing, "ROW_GROUP", 3)
    make_sa1b(tmp_path / "in", coco_files[:10])
    plan = plan_source("sa1b", str(tmp_path / "in"), Layout(str(tmp_path / "out")).listings, local_map)
    ((_, url, n),) = plan.units
    assert n == 10 and pq.ParquetFile(url).num_row_groups == 4
    whole = read_listing(url)
    for start, stop in ((0, 4), (4, 8), (8, 10), (2, 3), (9, None), (0, None)):
        assert read_listing(url, start, stop) == whole[start:stop]
