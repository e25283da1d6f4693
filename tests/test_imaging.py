"""decode_image / header_size on every hostile file in ../shared/data/edge_cases, plus prefetch."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from curation.imaging import (
    DEFAULT_MAX_PIXELS,
    REASONS,
    ImageDecodeError,
    _jpeg_header,
    check_complete,
    decode_image,
    header_size,
    prefetch,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EDGE = SHARED / "data" / "edge_cases"
COCO = SHARED / "data" / "coco"
MANIFEST = json.loads((EDGE / "manifest.json").read_text())
_OPENED = re.compile(r"^\S+ (\S+) \((\d+), (\d+)\) frames=(\d+) orient=(\S+)$")


def _expected(entry: dict) -> tuple[str, tuple[int, int] | None]:
    """("ok", displayed size) or ("error", reason) from what the manifest says Pillow does with the file."""
    opened = _OPENED.match(entry["open"])
    if opened is None:
        if entry["open"].startswith("UnidentifiedImageError"):
            return "unidentified", None
        if entry["open"].startswith("DecompressionBombError"):
            return "decompression_bomb", None
        return ("truncated_image" if "Truncated" in entry["open"] else "decode_error"), None
    w, h, orient = int(opened[2]), int(opened[3]), opened[5]
    if entry["file"].endswith((".tif", ".tiff")):
        orient = "1"  # Pillow reports TIFF sizes as displayed already
    if w * h > DEFAULT_MAX_PIXELS:
        return "too_many_pixels", None
    if entry["load"] != "ok":
        return ("truncated_image" if "truncated" in entry["load"] else "decode_error"), None
    return "ok", ((h, w) if orient in ("5", "6", "7", "8") else (w, h))


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_edge_case_decodes_to_rgb_or_raises_a_reason(entry: dict) -> None:
    data = (EDGE / entry["file"]).read_bytes()
    outcome, size = _expected(entry)
    if outcome == "ok":
        im = decode_image(data)
        assert im.mode == "RGB"
        assert im.size == size == header_size(data)
        im.tobytes()  # the pixels really are there
    else:
        with pytest.raises(ImageDecodeError) as err:
            decode_image(data)
        assert err.value.reason == outcome
        assert err.value.reason in REASONS and str(err.value).startswith(outcome)


def _pillow_displayed_size(data: bytes) -> tuple[int, int]:
    im = Image.open(io.BytesIO(data))
    try:
        orientation = im.getexif().get(0x0112, 1)
    except OSError:  # PNG's getexif() reads past the pixels, e.g. into a truncated file
        orientation = 1
    if im.format == "TIFF":  # Pillow reports TIFF sizes as displayed already
        return im.size
    return (im.height, im.width) if orientation in (5, 6, 7, 8) else im.size


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_header_size_agrees_with_pillow(entry: dict) -> None:
    data = (EDGE / entry["file"]).read_bytes()
    try:
        expected = _pillow_displayed_size(data)
    except Image.DecompressionBombError:
        with pytest.raises(ImageDecodeError, match="decompression_bomb"):
            header_size(data)
        return
    except Exception:
        with pytest.raises(ImageDecodeError) as err:
            header_size(data)
        assert err.value.reason in ("unidentified", "truncated_image", "decode_error")
        return
    assert header_size(data) == expected


def test_header_size_jpeg_fast_path_matches_pillow_on_coco() -> None:
    files = sorted(COCO.glob("*.jpg"))
    assert files
    for path in files:
        data = path.read_bytes()
        assert _jpeg_header(data) is not None  # plain camera JPEGs take the fast path
        assert header_size(data) == _pillow_displayed_size(data)


def _quadrants(width: int, height: int) -> Image.Image:
    """Four flat colours, so any flip or rotation changes the pixels."""
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 2, : width // 2] = (255, 0, 0)
    a[: height // 2, width // 2 :] = (0, 255, 0)
    a[height // 2 :, : width // 2] = (0, 0, 255)
    a[height // 2 :, width // 2 :] = (255, 255, 0)
    return Image.fromarray(a)


def _encode(im: Image.Image, fmt: str, orientation: int | None = None, **kw: object) -> bytes:
    buf = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied(orientation: int, fmt: str) -> None:
    extra = {"quality": 95} if fmt == "JPEG" else {}
    data = _encode(_quadrants(48, 16), fmt, orientation, **extra)
    displayed = (16, 48) if orientation >= 5 else (48, 16)
    assert header_size(data) == displayed
    im = decode_image(data)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert im.size == displayed
    assert im.tobytes() == reference.tobytes()


def test_xmp_only_orientation_is_honoured() -> None:
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    data = _encode(_quadrants(40, 20), "JPEG", xmp=xmp)
    assert _jpeg_header(data) is None  # left to Pillow, which reads XMP
    assert header_size(data) == (20, 40) == decode_image(data).size


def test_hopper_orientation_files_come_out_upright() -> None:
    upright = np.asarray(decode_image((EDGE / "other_formats/hopper.webp").read_bytes()), np.float32)
    for k in (2, 4, 6, 7):
        data = (EDGE / f"exif_orientation/hopper_orientation_{k}.jpg").read_bytes()
        fixed = np.abs(np.asarray(decode_image(data), np.float32) - upright).mean()
        stored = np.abs(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32) - upright).mean()
        assert fixed < 10 < stored, (k, fixed, stored)


@pytest.mark.parametrize(
    "name",
    [
        "alpha_modes/transparent.webp",
        "alpha_modes/Stripes.png",
        "palette_transparency/rgb_trns.png",
        "palette_transparency/p_trns_single.png",
        "palette_transparency/1_trns.png",
        "palette_transparency/transparent.gif",
    ],
)
def test_transparency_is_composited_onto_white(name: str) -> None:
    data = (EDGE / name).read_bytes()
    rgba = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"), np.float32)
    alpha = rgba[..., 3:] / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    assert (alpha < 1).any()
    assert np.abs(np.asarray(decode_image(data), np.float32) - expected).max() <= 1.0


def test_sixteen_bit_is_rescaled_not_clipped() -> None:
    data = (EDGE / "high_bitdepth/16bit.cropped.tif").read_bytes()
    raw = np.asarray(Image.open(io.BytesIO(data))).astype(np.float64)
    out = np.asarray(decode_image(data))
    assert out.shape == (*raw.shape, 3)
    np.testing.assert_array_equal(out[..., 0], np.floor(raw / 257 + 0.5).astype(np.uint8))
    assert out.max() < 255  # Pillow's own convert("RGB") saturates this file to white


def test_cmyk_and_one_bit_and_animation() -> None:
    cmyk = decode_image((EDGE / "cmyk/pil_sample_cmyk.jpg").read_bytes())
    assert cmyk.mode == "RGB" and 5 < np.asarray(cmyk).mean() < 250
    one_bit = np.asarray(decode_image((EDGE / "tiny_and_extreme_aspect/g4_orientation_1.tif").read_bytes()))
    assert set(np.unique(one_bit)) <= {0, 255}
    data = (EDGE / "animated_multiframe/chi.gif").read_bytes()
    first = Image.open(io.BytesIO(data)).convert("RGB")
    assert decode_image(data).tobytes() == first.tobytes()


def test_too_many_pixels_is_refused_before_decoding() -> None:
    data = next(COCO.glob("*.jpg")).read_bytes()
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, max_pixels=1000)
    assert err.value.reason == "too_many_pixels"


def test_draft_keeps_the_target_size_and_the_content() -> None:
    data = sorted(COCO.glob("*.jpg"))[0].read_bytes()
    full = decode_image(data)
    small = decode_image(data, target_size=(64, 64))
    assert 64 <= min(small.size) and small.width < full.width  # DCT-scaled, never below the target
    ratio = full.width / small.width
    assert ratio in (2, 4, 8) or abs(full.height / small.height - ratio) < 0.05
    a = np.asarray(full.resize((64, 48), Image.Resampling.BOX), np.float32)
    b = np.asarray(small.resize((64, 48), Image.Resampling.BOX), np.float32)
    assert np.abs(a - b).mean() < 4.0


def test_draft_on_rotated_jpeg_respects_displayed_target() -> None:
    data = _encode(_quadrants(400, 200), "JPEG", 6, quality=95)
    im = decode_image(data, target_size=(50, 100))  # displayed 200x400 -> 1/4 scale is the deepest allowed
    assert im.size == (50, 100)


def test_prefetch_is_ordered_bounded_and_returns_errors() -> None:
    calls: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            calls.append(i)
        time.sleep(0.001 * (i % 3))  # finish out of order
        if i == 5:
            raise ValueError("bad item")
        return i * i

    out = []
    for n, value in enumerate(prefetch(range(20), work, threads=3, ahead=4)):
        with lock:
            assert len(calls) <= n + 4  # never more than `ahead` items beyond the consumer
        out.append(value)
    assert [v for i, v in enumerate(out) if i != 5] == [i * i for i in range(20) if i != 5]
    assert isinstance(out[5], ValueError)


def test_prefetch_stops_when_the_consumer_stops() -> None:
    calls: list[int] = []
    stream = prefetch(range(1000), calls.append, threads=2, ahead=3)
    next(stream)
    stream.close()
    assert len(calls) <= 4
    with pytest.raises(ValueError):
        next(prefetch([1], str, threads=0, ahead=1))


def _kind(data: bytes) -> str | None:
    return next((k for k, magic in (("jpeg", b"\xff\xd8\xff"), ("png", b"\x89PNG"), ("gif", b"GIF8"),
                                    ("webp", b"RIFF")) if data.startswith(magic)), None)  # fmt: skip


def test_end_check_passes_every_whole_file_and_fails_each_cut_one() -> None:
    """Ingest's cheap end check (`header_size(complete=True)`) on all of ../shared/data: the files the manifest
    says load whole pass (trailing bytes after the end included), and each JPEG, PNG, GIF and WebP cut short fails
    `truncated_image`, also when the cut leaves a sound header (a JPEG with an EXIF thumbnail, its own EOI early)."""
    manifest = {e["file"]: e for e in MANIFEST}
    files = [
        p for p in sorted(SHARED.joinpath("data").rglob("*")) if p.is_file() and p.suffix not in (".json", ".jsonl")
    ]
    checked = 0
    for path in files:
        data = path.read_bytes()
        entry = manifest.get(path.relative_to(EDGE).as_posix()) if path.is_relative_to(EDGE) else None
        whole = entry is None or entry.get("load") == "ok"
        if whole and _kind(data):
            check_complete(data)
            header_size(data, complete=True)
            for keep in (0.5, 0.9):
                with pytest.raises(ImageDecodeError) as err:
                    header_size(data[: int(len(data) * keep)], complete=True)
                assert err.value.reason == "truncated_image", (path, keep)
            checked += 1
    assert checked > 60
    with pytest.raises(ImageDecodeError, match="truncated_image"):
        header_size((EDGE / "truncated" / "truncated_jpeg.jpg").read_bytes(), complete=True)
