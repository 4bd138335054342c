"""One source image -> one prepared image: decode fully, convert to RGB, ADM centre crop, PNG-encode.

Pure per-image functions with no state, so `prepare`'s worker processes can run them. Bad inputs raise `Skip`
with the short reason the manifest records.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageFile

MIN_SIDE = 8
_MAGIC = [(b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"), (b"RIFF", "WebP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")]


class Skip(Exception):
    """An input that cannot become a training image; the message is the manifest's short reason."""


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with BOX while the short side is >= 2*size, BICUBIC to size, crop the centre."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette and alpha images to RGB (transparency composited on white)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257  # 16-bit samples
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    return img.convert("RGB")


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def load_image(data: bytes, resolution: int, max_pixels: int) -> Image.Image:
    """Decode fully (so truncation shows), convert to RGB, centre-crop. Raises Skip with a short reason."""
    if not data:
        raise Skip("zero-byte file")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise Image.DecompressionBombError
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Skip(f"too large (over {max_pixels} pixels; decompression-bomb guard)") from None
    except Image.UnidentifiedImageError:
        fmt = next((name for magic, name in _MAGIC if data.startswith(magic)), None)
        raise Skip(f"corrupt (a {fmt} signature, but PIL cannot decode it)" if fmt else "not an image") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error) on bad data
        raise Skip(f"unreadable or truncated ({(str(e).splitlines() or [type(e).__name__])[0][:80]})") from None
    if min(img.size) < MIN_SIDE:
        raise Skip(f"too small ({img.width}x{img.height}, need >= {MIN_SIDE} px)")
    try:
        return center_crop(to_rgb(img), resolution)
    except Exception as e:
        raise Skip(f"unsupported image ({img.mode}: {type(e).__name__})") from None


def image_png(data: bytes, resolution: int, max_pixels: int, passthrough: bool = False) -> bytes:
    """Source bytes -> prepared PNG; with `passthrough`, an already prepared PNG keeps its exact bytes."""
    img = load_image(data, resolution, max_pixels)
    if passthrough and data[:8] == b"\x89PNG\r\n\x1a\n":
        with Image.open(io.BytesIO(data)) as src:
            if src.mode == "RGB" and src.size == (resolution, resolution):
                return data  # already prepared: keep the exact bytes so re-sharding keeps the content hash
    return encode_png(img)


@contextlib.contextmanager
def pil_guard(max_pixels: int):
    """PIL's bomb check at our limit, its warning as an error, truncated files as errors, for one run."""
    old = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old
