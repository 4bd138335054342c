"""Evaluation prompts (`text.prompts`: a text file, one caption per line) and their reference images
(`text.prompt_images`: a folder, image k for prompt k, used as the FD/FID reference set)."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from aligntok.data.images import Skip, load_image, pil_guard
from aligntok.data.shards import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def read_prompts(path: Path) -> list[str]:
    """The prompts of a UTF-8 text file, one per line, stripped; blank lines are skipped (a BOM is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found (text.prompts); expected a text file, one caption per line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected a text file, one caption per line") \
            from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts (empty or blank lines only); expected one caption per line")
    return prompts


def _natural(name: str) -> list:
    """'img2.png' before 'img10.png': digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def prompt_images(folder: Path, n: int) -> list[Path]:
    """The first `n` image files of `folder` in natural name order (image k belongs to prompt k)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: reference image folder not found (text.prompt_images); expected a folder of "
                        f"images, one per prompt, in prompt order by name")
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: _natural(p.name))
    if len(files) < n:
        raise DataError(f"{folder}: {len(files)} reference images for {n} prompts (text.prompt_images); expected at "
                        f"least one image ({', '.join(IMAGE_SUFFIXES)}) per prompt")
    return files[:n]


def reference_image(path: Path, resolution: int, max_pixels: int = 89_478_485) -> Image.Image:
    """A reference image as prepare would make it (RGB, centre-cropped to `resolution`); a bad file is one line."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: unreadable reference image ({e.strerror or type(e).__name__})") from None
    try:
        with pil_guard(max_pixels):
            return load_image(data, resolution, max_pixels)
    except Skip as e:
        raise DataError(f"{path}: bad reference image ({e}); expected a decodable image") from None
