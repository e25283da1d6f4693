import io
import tarfile

import pytest

from curation.sources import list_source
from curation.sources.base import SourceError
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
