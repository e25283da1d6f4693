"""Image decoding front end shared by the caption and feature stages.

Every hostile input either comes out as an RGB image of its displayed size (EXIF orientation applied) or
raises `ImageDecodeError` whose `reason` is one of `REASONS`, so a stage can store it as the sample's error.
"""

from __future__ import annotations

import io
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

T = TypeVar("T")
R = TypeVar("R")

REASONS = ("truncated_image", "unidentified", "decompression_bomb", "too_many_pixels", "decode_error")
DEFAULT_MAX_PIXELS = 64_000_000
_WHITE = (255, 255, 255)
_ORIENTATION_TAG = 0x0112
_EXIF_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")  # where Pillow finds orientation
# JPEG start-of-frame markers carrying the size (Pillow's SOF handler set minus DHP, which is left to Pillow).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Segments skipped by length: DHT, DAC, DQT, DRI, COM and APPn (APP1 is read for EXIF).
_JPEG_SKIP = frozenset({0xC4, 0xCC, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)} - {0xE1})


class ImageDecodeError(ValueError):
    """An image that cannot be turned into RGB pixels; `reason` is a stable category from `REASONS`."""

    def __init__(self, reason: str, message: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}" if message else reason)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError("decompression_bomb", str(e)) from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError("unidentified", str(e)) from e
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, struct.error... on hostile headers
        raise _classify(e) from e


def _classify(e: Exception) -> ImageDecodeError:
    msg = f"{type(e).__name__}: {e}"
    return ImageDecodeError("truncated_image" if "truncated" in str(e).lower() else "decode_error", msg)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation still to apply to `im.size` (1 = none)."""
    if im.format == "TIFF":
        return 1  # Pillow's TIFF plugin already reports the displayed size and transposes on load
    # getexif() parses EXIF/XMP; skipping it when the header has neither keeps header reads cheap.
    if not any(k in im.info for k in _EXIF_KEYS):
        return 1
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block is ignored, as exif_transpose would ignore a bad value
        return 1
    return value if isinstance(value, int) else 1


def _exif_orientation(tiff: bytes) -> int | None:
    """Orientation from a TIFF-structured EXIF block (IFD0); None when it does not parse cleanly."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    endian = "<" if tiff[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(endian + "I", tiff, 4)
        (count,) = struct.unpack_from(endian + "H", tiff, ifd)
        for i in range(count):
            tag, typ, n, value = struct.unpack_from(endian + "HHIH", tiff, ifd + 2 + 12 * i)
            if tag == _ORIENTATION_TAG:
                return value if typ == 3 and n == 1 else None
    except struct.error:
        return None
    return 1


def _jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, orientation, where the first scan's data begins) of a plain, well-formed JPEG read
    straight from its markers.

    Pillow's Image.open costs ~75 us per JPEG here; this scan costs a few. Anything unusual (junk between
    markers, XMP-only orientation, odd bit depth, repeated EXIF) returns None so Pillow decides.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, n = 2, len(data)
    size: tuple[int, int] | None = None
    orientation = 1
    seen_exif = False
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        body = pos + 4
        end = pos + 2 + length
        if length < 2 or end > n:
            return None
        if marker == 0xDA:  # start of scan: the header is over
            if size is None:
                return None
            return size[0], size[1], orientation, end
        if marker in _JPEG_SOF:
            if length < 8 or data[body] != 8 or data[body + 5] not in (1, 3, 4):
                return None
            h, w = struct.unpack_from(">HH", data, body + 1)
            if w == 0 or h == 0:
                return None
            size = (w, h)
        elif marker == 0xE1:
            if data.startswith(b"Exif\0\0", body):
                if seen_exif:
                    return None
                seen_exif = True
                found = _exif_orientation(data[body + 6 : end])
                if found is None:
                    return None
                orientation = found
            elif data.startswith(b"http://ns.adobe.com/xap/1.0/", body):
                return None  # XMP may carry an orientation Pillow honours
        elif marker not in _JPEG_SKIP:
            return None
        pos = end
    return None


def _png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, 1, 0) of a PNG whose chunks before the pixels hold no EXIF; None leaves it to Pillow."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    width, height = struct.unpack_from(">II", data, 16)
    if width == 0 or height == 0:
        return None
    pos = 33  # after IHDR's 13 bytes and CRC
    while pos + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        if kind in (b"IDAT", b"IEND"):
            return width, height, 1, 0
        if kind == b"eXIf":
            return None  # an orientation Pillow would honour
        pos += 12 + length
    return None


def _bomb_check(width: int, height: int) -> None:
    # Same threshold as Pillow's Image.open, which the JPEG fast path bypasses.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > 2 * limit:
        raise ImageDecodeError("decompression_bomb", f"{width}x{height} exceeds {2 * limit} pixels")


def header_size(data: bytes, *, complete: bool = False) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientations 5-8 swap them), read from the header only.

    `complete=True` (ingest) also checks that the file has its end (`check_complete`), first: a cut file may not
    even open, and its reason is that it was cut. An orientation stored after the pixel data (a PNG eXIf chunk after
    IDAT) is not seen; such files are rare.
    """
    jpeg = _jpeg_header(data)
    if complete and not (jpeg is not None and data.endswith(b"\xff\xd9")):  # that case, inline: most files
        check_complete(data, jpeg[3] if jpeg else None)
    fast = jpeg or _png_header(data)
    if fast is not None:
        width, height, orientation, _ = fast
        _bomb_check(width, height)
    else:
        im = _open(data)
        (width, height), orientation = im.size, _orientation(im)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _jpeg_scan_start(data: bytes) -> int | None:
    """Where the first scan's entropy-coded data begins, walking the segments by their lengths (so an EXIF
    thumbnail's own markers are stepped over); None when the segments do not parse. Junk between segments is
    skipped to the next 0xFF, as Pillow's reader does."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return None
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes before a marker
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker == 0xDA:
            return pos + 2 + length
        pos += 2 + length
    return None


def check_complete(data: bytes, scan: int | None = None) -> None:
    """Raise `truncated_image` when a JPEG, PNG, GIF or WebP lacks its end: what a cut download or copy loses.

    Only what costs nothing beside the bytes in memory: a JPEG's EOI marker after its first scan, a PNG's IEND
    chunk, a GIF's 0x3B trailer (zero padding allowed), a WebP's RIFF size within the file. Bytes after the end
    (padding, appended data, seen in real files) are allowed. Other formats are left to the decode. `scan`: where
    a JPEG's first scan begins, when the caller's header walk found it already.
    """
    if data[:3] == b"\xff\xd8\xff":
        if data.endswith(b"\xff\xd9") and scan is not None:  # the common case, O(1): EOI last, after the scan
            return
        scan = scan if scan is not None else _jpeg_scan_start(data)
        if scan is not None and data.rfind(b"\xff\xd9") < scan:
            raise ImageDecodeError("truncated_image", "the JPEG has no end-of-image marker after its scan")
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if data[-8:-4] != b"IEND" and data.rfind(b"IEND", 33) < 0:
            raise ImageDecodeError("truncated_image", "the PNG has no IEND chunk")
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        if not data.rstrip(b"\0").endswith(b";"):
            raise ImageDecodeError("truncated_image", "the GIF has no trailer")
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        (size,) = struct.unpack_from("<I", data, 4)
        if len(data) < 8 + size:
            raise ImageDecodeError("truncated_image", f"the WebP holds {len(data):,} of its {8 + size:,} bytes")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_bitdepth_to_rgb(im)
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or im.has_transparency_data:  # incl. tRNS colour keys
        # Transparent pixels become white: black would add dark halos to logos and cut-outs.
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im if mode == "RGB" else im.convert("RGB")


def _high_bitdepth_to_rgb(im: Image.Image) -> Image.Image:
    import numpy as np

    # Pillow's convert("RGB") clips 16-bit values at 255 (a white image); rescale to 8 bits instead.
    arr = np.asarray(im, dtype=np.float32)
    if im.mode == "F":
        scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
    else:
        scale = 1.0 / 257.0 if im.mode.startswith("I;16") or (arr.size and float(arr.max()) > 255) else 1.0
    gray = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    profile = im.info.get("icc_profile")
    if profile:
        # The embedded profile is the only faithful CMYK->RGB; Pillow's formula is a rough fallback.
        from PIL import ImageCms

        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    return im.convert("RGB")


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, target_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode encoded bytes to an RGB image as displayed (first frame of animations).

    target_size=(w, h) is the smallest displayed size the caller will resize to; large JPEGs are then
    decoded with libjpeg's DCT scaling (1/2, 1/4, 1/8), which keeps both sides >= the target and is several
    times faster. Transparency is composited onto white; 16-bit samples are scaled to 8 bits; an embedded ICC
    profile is applied to CMYK only (RGB pixels pass as stored, as trainers' loaders read them).
    Raises ImageDecodeError (see REASONS).
    """
    im = _open(data)
    width, height = im.size
    if width * height > max_pixels:
        raise ImageDecodeError("too_many_pixels", f"{width}x{height} exceeds {max_pixels} pixels")
    try:
        if target_size is not None and im.format in ("JPEG", "MPO"):
            tw, th = target_size
            if _orientation(im) in (5, 6, 7, 8):
                tw, th = th, tw  # the draft works on stored pixels, before the rotation
            im.draft("RGB", (tw, th))
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        return _to_rgb(im)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError("decompression_bomb", str(e)) from e
    except Exception as e:  # hostile pixel data surfaces as OSError, ValueError, SyntaxError, EOFError...
        raise _classify(e) from e


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last one shorter): the batches a model stage feeds its processor."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prefetch(items: Iterable[T], fn: Callable[[T], R], *, threads: int, ahead: int) -> Iterator[R | Exception]:
    """Ordered map of fn over items on a thread pool, at most `ahead` results in flight.

    A failing item yields its exception as a value so one bad image does not stop the stream. Pillow and
    torch release the GIL while decoding, so threads overlap decoding with the model.
    """
    if threads < 1 or ahead < 1:
        raise ValueError(f"threads and ahead must be >= 1, got threads={threads}, ahead={ahead}")
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prefetch")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield _outcome(pending.popleft())
        while pending:
            yield _outcome(pending.popleft())
    finally:
        # A consumer that stops early must not wait for work it will never read.
        pool.shutdown(wait=True, cancel_futures=True)


def _outcome(future: Future[R]) -> R | Exception:
    error = future.exception()
    if error is None:
        return future.result()
    if isinstance(error, Exception):
        return error
    raise error  # KeyboardInterrupt and friends are not per-item failures
