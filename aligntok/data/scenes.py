"""Captioned synthetic scenes: the text-to-image task's CPU-sized data set.

A scene is one object, or two identical ones, of a named shape and colour, placed in a named part of the image
(left, right, top or bottom) on a named background colour. Its caption says exactly those five attributes, e.g.
"two red stars at the left on a black background". Unlike a web caption, every word can be checked in the picture,
so a generated sample can be checked against its prompt (aligntok/eval/caption_judge.py reads each attribute).

Scene i is drawn from an RNG seeded by (seed, i) alone: its attributes first (uniform over each attribute's
values), then size, position, rotation, shade and noise jitter that stay well inside the attribute's value, so that
each attribute is unambiguous to a viewer at 32 px. Any subset at any resolution is byte-for-byte reproducible, and
a scene is the same picture at every resolution (geometry in fractions of the side, noise drawn last).
"""
from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image, ImageDraw

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star"),
    "colour": ("red", "green", "blue", "yellow"),
    "background": ("black", "grey", "white"),
    "count": ("one", "two"),
    "position": ("left", "right", "top", "bottom"),
}
SCENE_CLASSES = ATTRIBUTES["shape"]

# Object colours are saturated, backgrounds are neutral: every object colour is >= 130 apart (RGB distance) from
# every background, and the shade jitter below moves a colour by at most 15 per channel.
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 235), "yellow": (235, 200, 20)}
BACKGROUNDS = {"black": (15, 15, 15), "grey": (128, 128, 128), "white": (240, 240, 240)}
PLURALS = {shape: shape + "s" for shape in ATTRIBUTES["shape"]}
# Where the group's centre lies, as (x, y) fractions of the side; two objects stand one above the other at the left
# or right and side by side at the top or bottom, so the pair stays inside the named half.
CENTRES = {"left": (0.26, 0.5), "right": (0.74, 0.5), "top": (0.5, 0.26), "bottom": (0.5, 0.74)}

_CAPTION = re.compile(r"(one|two) (\w+) (\w+) at the (\w+) on a (\w+) background")


def scene_label(attrs: dict[str, str]) -> int:
    """The class label of a scene: the index of its shape, so class-based metrics still apply."""
    return SCENE_CLASSES.index(attrs["shape"])


def _attributes(rng: np.random.Generator) -> dict[str, str]:
    return {name: values[int(rng.integers(len(values)))] for name, values in ATTRIBUTES.items()}


def scene_attributes(index: int, seed: int) -> dict[str, str]:
    """The attributes of scene `index` (the first draws of its RNG, so they match `draw_scene`)."""
    return _attributes(np.random.default_rng([seed, index]))


def scene_caption(attrs: dict[str, str]) -> str:
    shape = attrs["shape"] if attrs["count"] == "one" else PLURALS[attrs["shape"]]
    return (f"{attrs['count']} {attrs['colour']} {shape} at the {attrs['position']} "
            f"on a {attrs['background']} background")


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a scene caption names (the inverse of `scene_caption`)."""
    match = _CAPTION.fullmatch(text.strip())
    expected = ("expected '<count> <colour> <shape> at the <position> on a <background> background' with "
                + "; ".join(f"{name} in {'|'.join(values)}" for name, values in ATTRIBUTES.items()))
    if match is None:
        raise ValueError(f"{text!r} is not a scene caption: {expected}")
    count, colour, noun, position, background = match.groups()
    nouns = {shape: shape for shape in ATTRIBUTES["shape"]} if count == "one" else {p: s for s, p in PLURALS.items()}
    if noun not in nouns:
        raise ValueError(f"{text!r} is not a scene caption: {expected} "
                         f"(the shape is singular after 'one', plural after 'two')")
    attrs = {"shape": nouns[noun], "colour": colour, "background": background, "count": count, "position": position}
    for name, values in ATTRIBUTES.items():
        if attrs[name] not in values:
            raise ValueError(f"{text!r} is not a scene caption: {expected}")
    return attrs


def chance_levels() -> dict[str, float]:
    """Accuracy of a uniform random guess, per attribute and for the whole caption (prompts are uniform)."""
    out = {f"attr_acc_{name}": 1.0 / len(values) for name, values in ATTRIBUTES.items()}
    out["caption_acc"] = math.prod(out.values())
    return out


def _outline(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape of visual radius r centred at (cx, cy), upright up to `rot`; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":  # half-side 0.85 r, axis-aligned up to rot
        corners = [(math.pi / 4 + k * math.pi / 2) for k in range(4)]
        return [(cx + 0.85 * math.sqrt(2) * r * math.cos(a + rot), cy + 0.85 * math.sqrt(2) * r * math.sin(a + rot))
                for a in corners]
    spikes, outer, inner = (3, 1.15 * r, None) if shape == "triangle" else (5, 1.15 * r, 0.45 * 1.15 * r)
    n = spikes * (2 if inner else 1)
    pts = []
    for k in range(n):  # the first vertex points up (image y grows downwards)
        radius = inner if inner and k % 2 else outer
        a = -math.pi / 2 + rot + 2 * math.pi * k / n
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def _shade(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int, channels: int) -> tuple[int, ...]:
    """rgb moved by at most `amount` per channel: one shift for all channels (1: a neutral stays neutral) or one
    per channel (3)."""
    shift = np.resize(rng.integers(-amount, amount + 1, channels), 3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + shift, 0, 255))


def draw_scene(index: int, resolution: int, seed: int) -> tuple[Image.Image, str]:
    """The RGB image (resolution x resolution) of scene `index` and its caption."""
    rng = np.random.default_rng([seed, index])
    attrs = _attributes(rng)
    supersample = 4 if resolution <= 64 else 2  # drawn large then BOX-downsampled: anti-aliased edges
    size = resolution * supersample
    background = _shade(rng, BACKGROUNDS[attrs["background"]], 10, channels=1)
    colour = _shade(rng, COLOURS[attrs["colour"]], 15, channels=3)
    two = attrs["count"] == "two"
    # visual radius: the circle's radius; the other shapes reach at most 1.15 r from the centre
    r = rng.uniform(0.10, 0.13) if two else rng.uniform(0.12, 0.16)
    cx, cy = CENTRES[attrs["position"]]
    cx, cy = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04)
    rot = rng.uniform(-0.05, 0.05) if attrs["shape"] == "square" else rng.uniform(-0.12, 0.12)
    if two:
        d = rng.uniform(0.2, 0.24)  # half the distance between the two centres: edges stay >= 0.1 apart
        vertical = attrs["position"] in ("left", "right")
        centres = [(cx, cy - d), (cx, cy + d)] if vertical else [(cx - d, cy), (cx + d, cy)]
    else:
        centres = [(cx, cy)]
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    for x, y in centres:
        pts = _outline(attrs["shape"], x * size, y * size, r * size, rot)
        if pts is None:
            draw.ellipse([(x - r) * size, (y - r) * size, (x + r) * size, (y + r) * size], fill=colour)
        else:
            draw.polygon(pts, fill=colour)
    small = np.asarray(img.resize((resolution, resolution), Image.BOX), np.float32)
    noise = rng.normal(0, rng.uniform(2, 6), (resolution, resolution, 3))
    out = np.clip(small + noise, 0, 255).round().astype(np.uint8)
    return Image.fromarray(out), scene_caption(attrs)
