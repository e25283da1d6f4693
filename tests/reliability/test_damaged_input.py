"""Archives and sidecars damaged the ways downloads and disks damage them, through the CLI: every sample the input
lists is a row with its reason, every skipped entry is counted, every damaged file is named once, and no traceback.

Each test builds one input holding many damaged source shards beside good ones, as a LAION or SA-1B download
has them (one bad tar among many must not stop the run), so one ingest covers many cases."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.sources.base import MAX_MEMBER_BYTES
from tests.conftest import EDGE_CASES
from tests.layouts import make_journeydb
from tests.outputs import index_rows
from tests.reliability import cli, one_error_line


def _ingest(source: str, src: Path, out: Path) -> list[str]:
    return ["ingest", "--source", source, "--input", str(src), "--output", str(out), "--no-progress"]


def _tar(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    """A tar of (name, data) files and special entries given as TarInfo (links, devices, FIFOs)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def _header_offset(data: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return next(i.offset for i in tar if i.name == name)


def _special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _i2d(key: str, image: bytes, caption: str = "a photo", meta: dict | None = None) -> list[tuple[str, bytes]]:
    """One img2dataset sample: <key>.jpg, .txt, .json as its webdataset writer lays them out."""
    meta = {"url": f"https://example.org/{key}.jpg", "caption": caption, "key": key, "status": "success"} | (meta or {})
    return [(f"{key}.jpg", image), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]


def _i2d_parquet(path: Path, keys: list[str]) -> None:
    rows = [{"key": k, "url": f"https://example.org/{k}.jpg", "caption": f"alt {k}", "status": "success",
             "error_message": None} for k in keys]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)


def _summary(stdout: str, label: str) -> dict[str, int]:
    """`[images] <label>: a=1, b=2` from the run summary."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(f"[images] {label}: ")), "")
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.split(": ", 1)[-1])} if line else {}


def _reasons(out: Path) -> dict[str, str]:
    return {k: r["error_reason"] or r["status"] for k, r in index_rows(out, "images").items()}


def test_damaged_img2dataset_shards_account_for_every_listed_sample(tmp_path, coco_files):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    jpg = [p.read_bytes() for p in coco_files[:5]]

    def shard(n: int, count: int = 5) -> tuple[list[str], bytes]:
        keys = [f"{n:05d}{i:04d}" for i in range(count)]
        return keys, _tar([m for i, k in enumerate(keys) for m in _i2d(k, jpg[i])])

    # 00000: the 3rd image's header has a bad checksum; the walk resyncs at the next header.
    keys0, data = shard(0)
    damaged = bytearray(data)
    damaged[_header_offset(data, f"{keys0[2]}.jpg") + 5] ^= 0xFF
    (src / "00000.tar").write_bytes(damaged)
    _i2d_parquet(src / "00000.parquet", keys0)
    # 00001: two archives concatenated (`cat a.tar b.tar`).
    keys1 = [f"00001{i:04d}" for i in range(4)]
    (src / "00001.tar").write_bytes(
        _tar([m for i, k in enumerate(keys1[:2]) for m in _i2d(k, jpg[i])])
        + _tar([m for i, k in enumerate(keys1[2:]) for m in _i2d(k, jpg[i])])
    )
    _i2d_parquet(src / "00001.parquet", keys1)
    # 00002: cut inside the 3rd image; 00003: cut inside the 3rd image's header block.
    keys2, data = shard(2)
    (src / "00002.tar").write_bytes(data[: _header_offset(data, f"{keys2[2]}.jpg") + 512 + 1000])
    _i2d_parquet(src / "00002.parquet", keys2)
    keys3, data = shard(3)
    (src / "00003.tar").write_bytes(data[: _header_offset(data, f"{keys3[2]}.jpg") + 200])
    _i2d_parquet(src / "00003.parquet", keys3)
    # 00004: links, a device and a FIFO beside one sample.
    specials = [_special("000040001.jpg", tarfile.SYMTYPE, "000040000.jpg"),
                _special("000040002.jpg", tarfile.LNKTYPE, "000040000.jpg"),
                _special("dev.jpg", tarfile.CHRTYPE), _special("pipe.jpg", tarfile.FIFOTYPE)]  # fmt: skip
    (src / "00004.tar").write_bytes(_tar([*_i2d("000040000", jpg[0]), *specials]))
    # 00005: a zero-byte tar; 00006: a tar that is garbage; 00009: a lone parquet that is garbage.
    (src / "00005.tar").write_bytes(b"")
    (src / "00006.tar").write_bytes(bytes(range(256)) * 40)
    (src / "00009.parquet").write_bytes(b"PAR1 but not really" * 10)
    # 00007, 00008: sound tars beside a parquet that is not parquet / has no key column.
    (src / "00007.tar").write_bytes(_tar(_i2d("000070000", jpg[0])))
    (src / "00007.parquet").write_bytes(b"<html>503 Service Unavailable</html>")
    (src / "00008.tar").write_bytes(_tar(_i2d("000080000", jpg[0])))
    pq.write_table(pa.table({"url": ["https://example.org/x.jpg"], "status": ["success"]}), src / "00008.parquet")
    # 00010: sidecars: a .json nested 200k deep, a lone surrogate escape in the json, invalid UTF-8 in the .txt.
    deep = ("[" * 200_000 + "]" * 200_000).encode()
    (src / "00010.tar").write_bytes(
        _tar(
            [
                *[(n, deep if n.endswith(".json") else d) for n, d in _i2d("000100000", jpg[0])],
                *[(n, d.replace(b"a photo", b"a \\ud800 photo")) for n, d in _i2d("000100001", jpg[1])],
                ("000100002.jpg", jpg[2]),
                ("000100002.txt", b"caf\xe9 au lait"),
                ("000100002.json", json.dumps({"url": "https://example.org/c.jpg", "key": "000100002"}).encode()),
            ]
        )
    )

    proc = cli(*_ingest("img2dataset", src, out))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows, reasons = index_rows(out, "images"), _reasons(out)
    assert {k: reasons[k] for k in keys0} == {**dict.fromkeys(keys0, "ok"), keys0[2]: "missing_image"}
    assert rows[keys0[2]]["source_id"] == f"https://example.org/{keys0[2]}.jpg"  # the parquet's data
    assert rows[keys0[2]]["original_caption"] == f"alt {keys0[2]}"
    assert {k: reasons[k] for k in keys1} == dict.fromkeys(keys1, "ok")
    assert [reasons[k] for k in keys2] == ["ok", "ok", "truncated_member", "missing_image", "missing_image"]
    assert [reasons[k] for k in keys3] == ["ok", "ok", "missing_image", "missing_image", "missing_image"]
    assert reasons["000040000"] == reasons["000070000"] == reasons["000080000"] == "ok"
    assert "000040001" not in rows and "000040002" not in rows
    assert reasons["000100000"] == "bad_sidecar" and "nested too deep" in rows["000100000"]["error"]
    assert reasons["000100001"] == "ok" and rows["000100001"]["original_caption"] == "a \\ud800 photo"
    assert reasons["000100002"] == "ok" and rows["000100002"]["original_caption"] == "caf\ufffd au lait"
    assert len(rows) == 5 + 4 + 5 + 5 + 1 + 1 + 1 + 3

    skipped = _summary(proc.stdout, "skipped")
    assert skipped == {"damaged_span": 2, "link": 2, "device": 1, "fifo": 1, "empty_archive": 1,
                       "damaged_archive": 2, "unreadable_sidecar": 2}, proc.stdout  # fmt: skip
    assert _summary(proc.stdout, "repaired") == {"escaped_text": 1, "invalid_utf8": 1}, proc.stdout
    failures = _summary(proc.stdout, "failures by reason")
    assert failures == {"missing_image": 6, "truncated_member": 1, "bad_sidecar": 1}, proc.stdout
    damage = [ln for ln in proc.stdout.splitlines() if ln.startswith("[images] damaged input: ")]
    for name in ("00000.tar", "00002.tar", "00003.tar", "00006.tar", "00007.parquet", "00008.parquet"):
        assert sum(name in ln for ln in damage) == 1, (name, damage)
    assert any("00009.parquet" in ln and "not a readable parquet file" in ln for ln in damage), damage

    again = cli(*_ingest("img2dataset", src, out))  # a rerun reads the kept listings: the same account
    assert again.returncode == 0 and _summary(again.stdout, "skipped") == skipped, again.stdout
    assert _reasons(out) == reasons


def _sa1b(sid: int, image: bytes, ext: str = "jpg", meta: bytes | None = None) -> list[tuple[str, bytes]]:
    record = {"image": {"image_id": sid, "width": 1, "height": 1, "file_name": f"sa_{sid}.{ext}"}, "annotations": []}
    return [(f"sa_{sid}.{ext}", image), (f"sa_{sid}.json", meta or json.dumps(record).encode())]


def _cut(path: Path, keep: float = 0.8) -> bytes:
    data = path.read_bytes()
    return data[: int(len(data) * keep)]


def test_damaged_sa1b_tars_and_images_are_failed_rows_or_counted(tmp_path, coco_files):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    jpg = [p.read_bytes() for p in coco_files[:6]]
    # sa_000000: a bad header checksum on the 3rd image; the members behind it still count.
    data = _tar([m for i in range(1, 6) for m in _sa1b(i, jpg[i])])
    damaged = bytearray(data)
    damaged[_header_offset(data, "sa_3.jpg") + 150] ^= 0x01  # inside the checksum field
    (src / "sa_000000.tar").write_bytes(damaged)
    # sa_000001: two archives concatenated; sa_000002: cut inside sa_22.jpg.
    (src / "sa_000001.tar").write_bytes(_tar(_sa1b(10, jpg[0]) + _sa1b(11, jpg[1])) + _tar(_sa1b(12, jpg[2])))
    data = _tar([m for i in range(20, 24) for m in _sa1b(i, jpg[i - 20])])
    (src / "sa_000002.tar").write_bytes(data[: _header_offset(data, "sa_22.jpg") + 512 + 700])
    # sa_000003: sidecars (200k deep; a lone surrogate) and images cut short behind a sound header.
    surrogate = b'{"image": {"image_id": 31, "file_name": "sa_\\udc80.jpg"}}'
    (src / "sa_000003.tar").write_bytes(
        _tar(
            _sa1b(30, jpg[0], meta=("[" * 200_000 + "]" * 200_000).encode())
            + _sa1b(31, jpg[1], meta=surrogate)
            + _sa1b(32, _cut(coco_files[2]))
            + _sa1b(33, _cut(EDGE_CASES / "alpha_modes" / "Stripes.png"), "png")
            + _sa1b(34, _cut(EDGE_CASES / "animated_multiframe" / "chi.gif"), "gif")
            + _sa1b(35, _cut(EDGE_CASES / "alpha_modes" / "transparent.webp", 0.95), "webp")
        )
    )
    # sa_000004: a member over the size cap (a sparse file: no disk used), then a sound one.
    big = tarfile.TarInfo("sa_40.jpg")
    big.size = MAX_MEMBER_BYTES + 1
    with open(src / "sa_000004.tar", "wb") as f:
        f.write(big.tobuf(format=tarfile.USTAR_FORMAT))
        f.seek(512 + big.size + (-big.size % 512))
        f.write(_tar(_sa1b(41, jpg[1])))
    # sa_000005.tar.gz: its gzip CRC fails; sa_000006.tar: zero bytes.
    packed = bytearray(gzip.compress(_tar(_sa1b(50, jpg[0]) + _sa1b(51, jpg[1]))))
    packed[-8] ^= 0x01  # the CRC32 in the gzip trailer
    (src / "sa_000005.tar.gz").write_bytes(packed)
    (src / "sa_000006.tar").write_bytes(b"")

    proc = cli(*_ingest("sa1b", src, out))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows, reasons = index_rows(out, "images"), _reasons(out)
    assert reasons == {
        "sa_1": "ok", "sa_2": "ok", "sa_4": "ok", "sa_5": "ok",
        "sa_10": "ok", "sa_11": "ok", "sa_12": "ok",
        "sa_20": "ok", "sa_21": "ok", "sa_22": "truncated_member",
        "sa_30": "bad_sidecar", "sa_31": "ok", "sa_32": "truncated_image", "sa_33": "truncated_image",
        "sa_34": "truncated_image", "sa_35": "truncated_image",
        "sa_40": "too_large", "sa_41": "ok",
        "sa_50": "corrupt_archive", "sa_51": "corrupt_archive",
    }  # fmt: skip
    assert json.loads(rows["sa_31"]["source_meta"])["file_name"] == "sa_\udc80.jpg"  # kept, as a JSON escape
    assert "CRC check failed" in rows["sa_50"]["error"]
    assert _summary(proc.stdout, "skipped") == {"damaged_span": 1, "empty_archive": 1}, proc.stdout
    assert _summary(proc.stdout, "repaired") == {"escaped_text": 1}, proc.stdout
    damage = [ln for ln in proc.stdout.splitlines() if ln.startswith("[images] damaged input: ")]
    for name in ("sa_000000.tar", "sa_000002.tar", "sa_000005.tar.gz"):
        assert sum(name in ln for ln in damage) == 1, (name, damage)


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("00000.tar", bytes(range(256)) * 40, "skipped: damaged_archive=1); {}: bytes 0-10,240 are no tar header"),
        ("00000.tar", b"", "skipped: empty_archive=1)"),
        ("00000.parquet", b"<html>404</html>", "skipped: damaged_archive=1); {} is not a readable parquet file"),
    ],
    ids=["garbage-tar", "zero-byte-tar", "garbage-parquet"],
)
def test_an_input_of_nothing_but_damage_is_one_line_naming_it(tmp_path, name, data, expected):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_bytes(data)
    line = one_error_line(cli(*_ingest("img2dataset", tmp_path / "in", tmp_path / "out")), "ingest")
    assert "no images found" in line and expected.format(tmp_path / "in" / name) in line, line


def test_journeydb_annotations_with_a_lone_surrogate_are_stored_escaped(tmp_path, coco_files):
    src, out = make_journeydb(tmp_path / "in", coco_files[:2], missing=0), tmp_path / "out"
    annotations = src / "annotation.jsonl"
    annotations.write_text(annotations.read_text().replace("a photo number 0", "a \\ud800 photo number 0"))
    proc = cli(*_ingest("journeydb", src, out))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows = index_rows(out, "images")
    assert rows["0000deadbeef"]["original_caption"].startswith("a \\ud800 photo number 0")
    assert rows["0000deadbeef"]["status"] == rows["0001deadbeef"]["status"] == "ok"
