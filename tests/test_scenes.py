"""Captioned synthetic scenes: every caption names what is drawn (colour, background, count, position and shape
read back from the pixels with a palette and geometry of this test's own), captions round-trip, and drawing is
deterministic."""
import itertools

import numpy as np
import pytest
from scipy import ndimage

from aligntok.data.scenes import (ATTRIBUTES, SCENE_CLASSES, chance_levels, draw_scene, parse_caption,
                                  scene_attributes, scene_caption, scene_label)

# Canonical colours, not the drawer's palette: a pixel is called by the nearest of these.
PALETTE = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "black": (0, 0, 0), "grey": (128, 128, 128), "white": (255, 255, 255)}
NAMES = list(PALETTE)
# The side each position points to, as (x, y) with y growing downwards.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
# Area of a shape over its bounding box: star 0.36, triangle 0.5, circle pi/4, square 1 for the ideal upright
# figures; the bands are cut halfway between the ranges measured on 300 scenes at 128 px.
FILL_BANDS = {"star": (0.0, 0.45), "triangle": (0.45, 0.64), "circle": (0.64, 0.86), "square": (0.86, 1.0)}


def colour_names(image) -> np.ndarray:
    a = np.asarray(image, np.float32)
    ref = np.asarray([PALETTE[n] for n in NAMES], np.float32)
    return ((a[..., None, :] - ref) ** 2).sum(-1).argmin(-1)


def blobs(image, colour: str) -> tuple[np.ndarray, list[int]]:
    """Connected regions of pixels of `colour`, and the labels of those of >= 3 pixels (a lone pixel is an
    anti-aliased edge that happens to be nearest the object colour)."""
    mask = colour_names(image) == NAMES.index(colour)
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels, [k + 1 for k, s in enumerate(sizes) if s >= 3]


def test_vocabulary_and_class_label():
    assert list(ATTRIBUTES) == ["shape", "colour", "background", "count", "position"]
    assert ATTRIBUTES["count"] == ("one", "two")
    assert ATTRIBUTES["position"] == ("left", "right", "top", "bottom")
    assert not set(ATTRIBUTES["colour"]) & set(ATTRIBUTES["background"])
    assert SCENE_CLASSES == ATTRIBUTES["shape"]
    for k, shape in enumerate(SCENE_CLASSES):
        assert scene_label({"shape": shape, "colour": "red", "count": "one"}) == k


def test_caption_known_values():
    assert scene_caption({"shape": "star", "colour": "red", "background": "black", "count": "two",
                          "position": "left"}) == "two red stars at the left on a black background"
    assert scene_caption({"shape": "circle", "colour": "blue", "background": "white", "count": "one",
                          "position": "top"}) == "one blue circle at the top on a white background"


def test_parse_inverts_caption_for_every_combination():
    captions = set()
    for values in itertools.product(*ATTRIBUTES.values()):
        attrs = dict(zip(ATTRIBUTES, values))
        caption = scene_caption(attrs)
        assert parse_caption(caption) == attrs, caption
        captions.add(caption)
    assert len(captions) == 4 * 4 * 3 * 2 * 4


@pytest.mark.parametrize("text", [
    "a photo of a cat",
    "",
    "two red star at the left on a black background",  # singular after two
    "one red stars at the left on a black background",  # plural after one
    "one purple circle at the top on a white background",
    "one red circle at the middle on a white background",
    "one red circle at the top on a red background",
    "three red circles at the top on a white background",
    "one red circle at the top on a white background, photorealistic",
])
def test_parse_refuses_what_is_not_a_scene_caption_in_one_line(text):
    with pytest.raises(ValueError) as err:
        parse_caption(text)
    message = str(err.value)
    assert "\n" not in message and repr(text) in message and "expected" in message, message


def test_chance_levels_are_exact():
    chance = chance_levels()
    expected = {"attr_acc_shape": 1 / 4, "attr_acc_colour": 1 / 4, "attr_acc_background": 1 / 3,
                "attr_acc_count": 1 / 2, "attr_acc_position": 1 / 4, "caption_acc": 1 / 384}
    assert chance.keys() == expected.keys()
    for key, value in expected.items():
        assert chance[key] == pytest.approx(value, rel=1e-12, abs=0), key


def test_attributes_are_the_first_draws_of_the_scene_and_uniform():
    # pins the order of the draws: a change would silently redraw every prepared scene data set
    assert scene_attributes(0, 0) == parse_caption("one blue star at the right on a grey background")
    assert scene_attributes(1, 0) == parse_caption("two yellow triangles at the right on a white background")
    for i in range(50):
        assert scene_caption(scene_attributes(i, 7)) == draw_scene(i, 32, 7)[1]
    n = 4000
    drawn = [scene_attributes(i, 3) for i in range(n)]
    for name, values in ATTRIBUTES.items():
        for value in values:
            p = 1 / len(values)
            freq = sum(a[name] == value for a in drawn) / n
            # 5 binomial standard deviations (<= 0.04 here): a skewed or constant draw is far outside
            assert abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n), (name, value, freq)


@pytest.mark.parametrize("resolution", [32, 64])
def test_the_drawing_shows_colour_background_count_and_position(resolution):
    for i in range(150):
        image, caption = draw_scene(i, resolution, 0)
        attrs = parse_caption(caption)
        names = colour_names(image)
        border = np.concatenate([names[0], names[-1], names[:, 0], names[:, -1]])
        assert (border == NAMES.index(attrs["background"])).mean() >= 0.95, (i, caption)
        labels, big = blobs(image, attrs["colour"])
        assert len(big) == {"one": 1, "two": 2}[attrs["count"]], (i, caption)
        ys, xs = np.nonzero(np.isin(labels, big))
        # centroid as a fraction of the side, from the image centre
        cx, cy = (xs.mean() + 0.5) / resolution - 0.5, (ys.mean() + 0.5) / resolution - 0.5
        dx, dy = DIRECTIONS[attrs["position"]]
        along, across = cx * dx + cy * dy, abs(cx * dy + cy * dx)
        assert along >= 0.15 and across <= 0.1, (i, caption, cx, cy)  # well inside the named half, not a corner


def test_the_drawing_shows_the_shape():
    for i in range(300):
        image, caption = draw_scene(i, 128, 0)
        attrs = parse_caption(caption)
        labels, big = blobs(image, attrs["colour"])
        lo, hi = FILL_BANDS[attrs["shape"]]
        for k in big:
            ys, xs = np.nonzero(labels == k)
            fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            assert lo <= fill <= hi, (i, caption, fill)


def test_drawing_is_deterministic_and_seed_dependent():
    image, caption = draw_scene(5, 32, 0)
    assert image.mode == "RGB" and image.size == (32, 32)
    again, caption_again = draw_scene(5, 32, 0)
    assert image.tobytes() == again.tobytes() and caption == caption_again
    assert draw_scene(5, 32, 1)[0].tobytes() != image.tobytes()
    assert draw_scene(6, 32, 0)[0].tobytes() != image.tobytes()
    assert draw_scene(5, 48, 0)[0].size == (48, 48) and draw_scene(5, 48, 0)[1] == caption


def test_a_scene_is_the_same_picture_at_every_resolution():
    # geometry is in fractions of the side: the 64 px scene box-downsampled is the 32 px one up to the noise
    # (sigma <= 6 per pixel in each, averaged over 4 pixels in the downsampled one): mean |difference| < 8
    for i in range(20):
        small = np.asarray(draw_scene(i, 32, 0)[0], np.float32)
        big = np.asarray(draw_scene(i, 64, 0)[0], np.float32).reshape(32, 2, 32, 2, 3).mean((1, 3))
        assert np.abs(small - big).mean() < 8, i
