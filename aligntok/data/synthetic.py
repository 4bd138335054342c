"""Procedurally generated, class-labelled RGB images: the embedded default data set.

Each class is a visual concept (shape or texture) whose colour, size, position, rotation and background vary
within the class. Image i is drawn from an RNG seeded by (seed, i) alone, so any subset at any resolution is
byte-for-byte reproducible.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SYNTHETIC_CLASSES = ["circle", "square", "triangle", "stripes", "checkerboard", "ring", "cross", "gradient",
                     "dots", "star", "diamond", "waves"]


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    for k in range(n * (2 if inner else 1)):
        radius = r if not inner or k % 2 == 0 else r * inner
        a = rot + 2 * math.pi * k / (n * (2 if inner else 1))
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def synthetic_image(index: int, label: int, resolution: int, seed: int) -> Image.Image:
    if not 0 <= label < len(SYNTHETIC_CLASSES):
        raise ValueError(f"synthetic label {label} out of range [0, {len(SYNTHETIC_CLASSES)})")
    rng = np.random.default_rng([seed, index])
    supersample = 4 if resolution <= 64 else 2  # drawn large then BOX-downsampled: anti-aliased edges
    size = resolution * supersample
    bg, fg = _colour(rng, 0, 110), _colour(rng, 130, 256)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.18, 0.34)
    cx, cy = size * rng.uniform(0.3, 0.7, 2)
    rot = rng.uniform(0, 2 * math.pi)
    name = SYNTHETIC_CLASSES[label]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, rot), fill=fg)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.3, 3, rot), fill=fg)
    elif name == "diamond":
        pts = [(cx, cy - 1.4 * r), (cx + 0.8 * r, cy), (cx, cy + 1.4 * r), (cx - 0.8 * r, cy)]
        draw.polygon(pts, fill=fg)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r * 1.3, 5, rot, inner=0.45), fill=fg)
    elif name == "ring":
        w = r * rng.uniform(0.25, 0.45)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=int(w))
    elif name == "cross":
        w = r * rng.uniform(0.3, 0.5)
        tilt = rng.uniform(-0.4, 0.4)
        for a in (tilt, tilt + math.pi / 2):
            dx, dy, nx, ny = r * math.cos(a), r * math.sin(a), -w / 2 * math.sin(a), w / 2 * math.cos(a)
            draw.polygon([(cx - dx + nx, cy - dy + ny), (cx + dx + nx, cy + dy + ny),
                          (cx + dx - nx, cy + dy - ny), (cx - dx - nx, cy - dy - ny)], fill=fg)
    elif name == "dots":
        step = size / rng.integers(3, 6)
        d = step * rng.uniform(0.2, 0.35)
        off = rng.uniform(0, step, 2)
        for x in np.arange(off[0] - step, size + step, step):
            for y in np.arange(off[1] - step, size + step, step):
                draw.ellipse([x - d, y - d, x + d, y + d], fill=fg)
    elif name in ("stripes", "checkerboard", "gradient", "waves"):
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        u = xx * math.cos(rot) + yy * math.sin(rot)
        v = -xx * math.sin(rot) + yy * math.cos(rot)
        freq = rng.uniform(3, 6)
        if name == "stripes":
            mask = (np.sin(2 * math.pi * freq * u) > 0).astype(np.float32)
        elif name == "checkerboard":
            mask = ((np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float32)
        elif name == "waves":
            mask = (np.sin(2 * math.pi * freq * u + 2.5 * np.sin(2 * math.pi * 1.5 * v)) > 0).astype(np.float32)
        else:
            mask = (u - u.min()) / max(1e-6, float(u.max() - u.min()))
        arr = np.asarray(bg, np.float32) * (1 - mask[..., None]) + np.asarray(fg, np.float32) * mask[..., None]
        img = Image.fromarray(arr.round().astype(np.uint8))
    noise = rng.normal(0, rng.uniform(2, 9), (resolution, resolution, 3))
    small = img.resize((resolution, resolution), Image.BOX)
    out = np.clip(np.asarray(small, np.float32) + noise, 0, 255).round().astype(np.uint8)
    result = Image.fromarray(out)
    if rng.random() < 0.3:
        result = result.filter(ImageFilter.GaussianBlur(radius=0.4))
    return result
