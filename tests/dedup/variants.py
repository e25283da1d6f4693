"""Generated copies of real photos that display as the same picture, and harder variants for the bench."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

_ORIENTATION_TAG = 0x0112


def _jpeg(image: Image.Image, quality: int = 92, exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def resized(image: Image.Image, scale: float = 0.5) -> bytes:
    w, h = image.size
    return _jpeg(image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS))


def recompressed(image: Image.Image, quality: int = 15) -> bytes:
    return _jpeg(image, quality=quality)


def exif_rotated(image: Image.Image) -> bytes:
    """Pixels stored turned a quarter to the left, with orientation 6 (turn right to display): looks the same."""
    exif = Image.Exif()
    exif[_ORIENTATION_TAG] = 6
    return _jpeg(image.transpose(Image.Transpose.ROTATE_90), exif=exif)


def cropped(image: Image.Image, fraction: float = 0.05) -> bytes:
    w, h = image.size
    dx, dy = round(w * fraction / 2), round(h * fraction / 2)
    return _jpeg(image.crop((dx, dy, w - dx, h - dy)))


def bordered(image: Image.Image, fraction: float = 0.03) -> bytes:
    w, h = image.size
    pad = max(1, round(min(w, h) * fraction))
    canvas = Image.new("RGB", (w + 2 * pad, h + 2 * pad), (255, 255, 255))
    canvas.paste(image.convert("RGB"), (pad, pad))
    return _jpeg(canvas)


def watermarked(image: Image.Image) -> bytes:
    marked = image.convert("RGB")
    w, h = marked.size
    draw = ImageDraw.Draw(marked)
    box = (round(w * 0.70), round(h * 0.88), round(w * 0.97), round(h * 0.97))
    draw.rectangle(box, fill=(255, 255, 255))
    draw.text((box[0] + 4, box[1] + 2), "(c) stock", fill=(0, 0, 0))
    return _jpeg(marked)
