import json

import pyarrow.parquet as pq

from curation.records import (
    Sample,
    arrow_schema,
    arrow_schema_json,
    json_schema,
    samples_to_table,
    table_to_samples,
)
from tests.conftest import REPO


def test_schema_files_are_pinned_to_the_dataclass():
    # Regenerate with `python -m curation.records schemas` after changing Sample.
    assert json.loads((REPO / "schemas" / "sample.schema.json").read_text()) == json_schema()
    assert json.loads((REPO / "schemas" / "index.schema.json").read_text()) == arrow_schema_json()


def test_sample_round_trips_through_parquet_and_json(tmp_path):
    a = Sample(key="sa_1", source="sa1b", source_id="1", ext="jpg", original_caption="héllo ✓")
    a.set_size(width=1500, height=2250)
    b = Sample(key="x", source="folder", source_id="x.png", ext="png")
    b.fail("truncated_image", "image file is truncated")
    pq.write_table(samples_to_table([a, b]), tmp_path / "i.parquet")
    table = pq.read_table(tmp_path / "i.parquet")
    assert table.schema.equals(arrow_schema(), check_metadata=False)
    assert table_to_samples(table) == [a, b]
    assert Sample.from_dict(json.loads(a.to_json())) == a
    assert a.bucket_1024 == "1.46" and a.bucket_256 == "1.46"


def test_json_schema_validates_records():
    import jsonschema

    ok = Sample(key="k", source="folder", source_id="k.jpg", ext="jpg")
    ok.set_size(640, 480)
    jsonschema.validate(ok.to_dict(), json_schema())
    bad = ok.to_dict() | {"status": "weird"}
    try:
        jsonschema.validate(bad, json_schema())
    except jsonschema.ValidationError:
        return
    raise AssertionError("an unknown status must not validate")


def test_images_index_carries_member_offsets():
    from curation.records import images_schema, images_table

    a = Sample(key="a", source="folder", source_id="a.jpg", ext="jpg")
    b = Sample(key="b", source="folder", source_id="b.jpg", ext="jpg")
    b.fail("truncated", "image file is truncated")
    table = images_table([a, b], {"a": (512, 1234)})
    assert table.schema.equals(images_schema(), check_metadata=False)
    assert table.select(["member_offset", "member_size"]).to_pylist() == [
        {"member_offset": 512, "member_size": 1234},
        {"member_offset": None, "member_size": None},
    ]
    assert table_to_samples(table) == [a, b]  # later stages read the Sample columns only
