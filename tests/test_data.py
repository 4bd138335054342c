"""prepare + shards + datasets, on real files."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from aligntok.data.dataset import ShardDataset, ShardIterable, decode_image, partition
from aligntok.data.shards import DataError, read_manifest
from aligntok.data.sources import center_crop, prepare_dataset


def prep(out, source="synthetic", root=None, n=60, res=32, seed=0, classes=10, rows=16, **kw):
    return prepare_dataset(source, out, root=root, resolution=res, num_images=n, num_classes=classes,
                           val_fraction=0.2, shard_rows=rows, seed=seed, **kw)


def shard_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.parquet"))}


def test_synthetic_is_deterministic_and_seed_dependent(tmp_path):
    a, b, c = (prep(tmp_path / x, seed=s) for x, s in (("a", 0), ("b", 0), ("c", 1)))
    assert a["content_hash"] == b["content_hash"] != c["content_hash"]
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert json.loads((tmp_path / "a/manifest.json").read_text()) == json.loads((tmp_path / "b/manifest.json").read_text())


@pytest.mark.numeric
def test_synthetic_classes_are_visually_distinct(tmp_path):
    prep(tmp_path, n=200, res=32)
    ds = ShardDataset(tmp_path, "train")
    feats = {}
    for i in range(len(ds)):
        x, y = ds[i]
        # a crude but real descriptor: per-channel spatial gradient energy + colour spread
        g = torch.cat([(x[:, 1:] - x[:, :-1]).abs().mean((1, 2)), (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2)), x.std((1, 2))])
        feats.setdefault(y, []).append(g)
    means = torch.stack([torch.stack(feats[c]).mean(0) for c in sorted(feats)])
    d = torch.cdist(means, means)
    assert len(feats) == 10
    # measured: nearest pair of classes 0.045 apart (median 0.29); 0.005 leaves a 9x margin
    assert d[~torch.eye(10, dtype=bool)].min() > 0.005


def test_synthetic_any_resolution_and_too_many_classes(tmp_path):
    m = prep(tmp_path / "r", n=4, res=48)
    x, _ = ShardDataset(tmp_path / "r", "train")[0] if m["counts"]["train"] else ShardDataset(tmp_path / "r", "val")[0]
    assert x.shape == (3, 48, 48)
    with pytest.raises(DataError, match="at most 12 classes"):
        prep(tmp_path / "x", classes=13)


def _save(img, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


@pytest.fixture
def messy_folder(tmp_path):
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    _save(photo, root / "cat" / "good.jpg")
    _save(photo.convert("L"), root / "cat" / "gray.png")
    _save(photo.convert("CMYK"), root / "cat" / "cmyk.jpg")
    _save(photo.convert("RGBA"), root / "dog" / "rgba.png")
    _save(photo.convert("P"), root / "dog" / "palette.png")
    _save(Image.new("RGB", (1, 1)), root / "dog" / "tiny.png")
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    (root / "dog" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    jpg = (root / "cat" / "good.jpg").read_bytes()
    (root / "cat" / "corrupt.jpg").write_bytes(jpg[:20] + b"\x00" * 200)
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_skips_bad_files_with_reasons(messy_folder, tmp_path):
    m = prepare_dataset("imagefolder", tmp_path / "out", root=messy_folder, resolution=32, num_images=None,
                        num_classes=2, val_fraction=0.0, shard_rows=4, seed=0)
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"cat/corrupt.jpg", "dog/truncated.png", "dog/tiny.png", "dog/empty.jpg", "dog/notes.txt"}
    assert reasons["dog/empty.jpg"] == "zero-byte file"
    assert reasons["dog/notes.txt"] == "not an image"
    assert reasons["dog/tiny.png"].startswith("too small (1x1")
    assert reasons["dog/truncated.png"].startswith("unreadable or truncated")
    assert reasons["cat/corrupt.jpg"] == "corrupt (a JPEG signature, but PIL cannot decode it)"
    assert m["class_names"] == ["cat", "dog"]
    assert m["counts"]["train"] == {"cat": 3, "dog": 2}
    ds = ShardDataset(tmp_path / "out", "train")
    assert sorted(ds.keys) == ["cat/cmyk.jpg", "cat/good.jpg", "cat/gray.png", "dog/palette.png", "dog/rgba.png"]
    assert all(ds[i][0].shape == (3, 32, 32) for i in range(len(ds)))
    stored = [Image.open(io.BytesIO(b)) for b in ds.images]
    assert {(im.format, im.mode, im.size) for im in stored} == {("PNG", "RGB", (32, 32))}


def test_decompression_bomb_is_skipped(tmp_path):
    _save(Image.new("RGB", (300, 300), "red"), tmp_path / "src" / "a" / "big.png")
    _save(Image.new("RGB", (40, 40), "blue"), tmp_path / "src" / "a" / "ok.png")
    m = prepare_dataset("imagefolder", tmp_path / "out", root=tmp_path / "src", resolution=16, num_images=None,
                        num_classes=1, val_fraction=0.0, shard_rows=4, seed=0, max_image_pixels=10_000)
    assert [s["path"] for s in m["skipped"]] == ["a/big.png"]
    assert "decompression-bomb" in m["skipped"][0]["reason"]


@pytest.mark.parametrize("source, make, msg", [
    ("imagefolder", lambda p: None, "does not exist"),
    ("imagefolder", lambda p: p.mkdir(), "no image files found"),
    ("parquet", lambda p: p.mkdir(), "no parquet shards found"),
])
def test_missing_or_empty_source_fails_clearly(tmp_path, source, make, msg):
    src = tmp_path / "src"
    make(src)
    with pytest.raises(DataError, match=msg):
        prepare_dataset(source, tmp_path / "out", root=src, resolution=16, num_images=None, num_classes=1,
                        val_fraction=0.1, shard_rows=4, seed=0)


@pytest.mark.numeric
def test_shard_round_trip_and_bounded_rows(tmp_path):
    m = prep(tmp_path / "a", n=50, rows=8)
    assert all(s["rows"] <= 8 for split in m["shards"].values() for s in split)
    ds = ShardDataset(tmp_path / "a", "train")
    from aligntok.data.synthetic import synthetic_image
    i = 3
    key = ds.keys[i]
    idx = int(key.split("-")[1])
    expected = np.asarray(synthetic_image(idx, idx % 10, 32, 0), np.float32) / 127.5 - 1
    x, y = ds[i]
    assert y == idx % 10
    # PNG is lossless and decode_image runs these same float32 numpy ops (/ 127.5, - 1): exact by construction
    assert torch.equal(x, torch.from_numpy(expected).permute(2, 0, 1))
    assert x.min() >= -1 and x.max() <= 1
    # re-shard the prepared set through the parquet source: same images, new shard size
    m2 = prepare_dataset("parquet", tmp_path / "b", root=tmp_path / "a", resolution=32, num_images=None,
                         num_classes=10, val_fraction=0.2, shard_rows=32, seed=0)
    assert m2["content_hash"] == m["content_hash"]
    assert m2["counts"] == m["counts"]


def test_split_is_stable_when_images_are_added(tmp_path):
    prep(tmp_path / "s", n=40), prep(tmp_path / "b", n=80)
    val_small = set(ShardDataset(tmp_path / "s", "val").keys)
    val_big = set(ShardDataset(tmp_path / "b", "val").keys)
    assert val_small and val_small <= val_big


def adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion (ADM) improved_diffusion/image_datasets.py center_crop_arr, verbatim but for names."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.numeric
def test_center_crop_is_adm_style():
    # 400 x 200, three vertical bands: red | green (the middle half of the width) | blue. Halved by BOX to
    # 200 x 100, bicubic to 128 x 64, the centre 64 columns are exactly the green band: PIL's fixed-point
    # resampling keeps a flat region flat, and only the outermost columns pick up a trace of the neighbours.
    a = np.zeros((200, 400, 3), np.uint8)
    a[:, :100], a[:, 100:300], a[:, 300:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    crop = np.asarray(center_crop(Image.fromarray(a), 64))
    assert crop.shape == (64, 64, 3)
    assert (crop[:, 1:63] == (0, 255, 0)).all()
    left, right = crop[:, 0], crop[:, 63]
    assert (left == left[0]).all() and (right == right[0]).all()
    assert 0 < left[0, 0] < 64 and left[0, 2] == 0 and 0 < right[0, 2] < 64 and right[0, 0] == 0
    assert left[0, 0] == right[0, 2]  # symmetric bands, symmetric crop (measured 13 of 255)
    # the same along the other axis
    tall = np.asarray(center_crop(Image.fromarray(np.ascontiguousarray(a.transpose(1, 0, 2))), 64))
    assert np.array_equal(tall, crop.transpose(1, 0, 2))
    # odd sizes (rounding of the scaled size, the crop offset) and repeated halving match ADM's code exactly:
    # the same PIL integer resampling, so the pixels are identical
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (333, 517, 3), dtype=np.uint8))
    for size in (64, 100, 333):
        assert np.array_equal(np.asarray(center_crop(noise, size)), adm_center_crop_arr(noise, size)), size


@pytest.mark.parametrize("n, world, workers", [(10, 1, 1), (10, 2, 1), (11, 3, 2), (7, 4, 3), (0, 2, 2)])
def test_partition_disjoint_and_complete(n, world, workers):
    parts = [list(partition(n, r, world, w, workers)) for r in range(world) for w in range(workers)]
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


def test_shard_iterable_over_ranks_and_workers_covers_each_index_once(tmp_path):
    prep(tmp_path, n=60)
    ds, seen = ShardDataset(tmp_path, "train"), []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(ShardIterable(tmp_path, "train", rank, 2), batch_size=5, num_workers=2)
        for idx, x, y in loader:
            seen += idx.tolist()
            assert y.tolist() == [ds.labels[i] for i in idx.tolist()]
            assert torch.equal(x[0], ds[int(idx[0])][0])
    assert sorted(seen) == list(range(len(ds)))


@pytest.mark.numeric
def test_decode_image_and_manifest_errors(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    x = decode_image(buf.getvalue())
    assert x[0].eq(1).all() and x[1].eq(-1).all()  # 255 / 127.5 - 1 and 0 / 127.5 - 1 are exact in fp32
    assert torch.equal(decode_image(buf.getvalue(), hflip=True), x.flip(-1))
    with pytest.raises(DataError, match="manifest not found; run `aligntok prepare` first"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="manifest is not valid JSON"):
        read_manifest(tmp_path)


@pytest.mark.numeric
def test_colour_modes_become_rgb_with_alpha_on_white(tmp_path):
    root = tmp_path / "src"
    _save(Image.new("RGBA", (40, 30), (10, 20, 30, 0)), root / "a" / "clear.png")
    _save(Image.new("LA", (40, 30), (90, 255)), root / "a" / "la.png")
    pal = Image.new("P", (40, 30), 3)
    pal.putpalette([0, 0, 0] * 3 + [200, 50, 10])
    _save(pal, root / "a" / "pal.png")
    _save(Image.new("L", (40, 30), 77), root / "a" / "gray.png")
    _save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), root / "a" / "cmyk.jpg", quality=95)
    m = prepare_dataset("imagefolder", tmp_path / "out", root=root, resolution=16, num_images=None, num_classes=1,
                        val_fraction=0.0, shard_rows=8, seed=0)
    assert m["skipped"] == []
    ds = ShardDataset(tmp_path / "out", "train")
    px = {k: ((ds[i][0][:, 8, 8] + 1) * 127.5).round().tolist() for i, k in enumerate(ds.keys)}
    assert px["a/clear.png"] == [255, 255, 255]
    assert px["a/la.png"] == [90, 90, 90]
    assert px["a/pal.png"] == [200, 50, 10]
    assert px["a/gray.png"] == [77, 77, 77]
    r, g, b = px["a/cmyk.jpg"]
    assert r > 200 and g < 40 and b < 40
    assert all(ds[i][0].shape == (3, 16, 16) for i in range(len(ds)))


def test_rerun_replaces_stale_shards_and_threads_do_not_change_output(tmp_path):
    first = prep(tmp_path / "a", n=40, rows=4, workers=1)
    assert len(list((tmp_path / "a").glob("*.parquet"))) == sum(len(v) for v in first["shards"].values()) > 4
    second = prep(tmp_path / "a", n=40, rows=64, workers=2)
    on_disk = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert on_disk == sorted(["manifest.json"] + [s["file"] for v in second["shards"].values() for s in v])
    assert second["content_hash"] == first["content_hash"]
    assert len(ShardDataset(tmp_path / "a", "train")) + len(ShardDataset(tmp_path / "a", "val")) == 40


def test_imagefolder_cap_samples_every_class(tmp_path):
    for c in "abc":
        for k in range(4):
            _save(Image.new("RGB", (20, 20), (k * 40, 0, 0)), tmp_path / "src" / c / f"{k}.png")
    m = prepare_dataset("imagefolder", tmp_path / "out", root=tmp_path / "src", resolution=8, num_images=6,
                        num_classes=3, val_fraction=0.0, shard_rows=8, seed=0)
    assert m["counts"]["train"] == {"a": 2, "b": 2, "c": 2}
    assert ShardDataset(tmp_path / "out").labels == [0, 1, 2, 0, 1, 2]


def test_hflip_flips_about_half_the_time(tmp_path):
    prep(tmp_path, n=20)
    plain, flipping = ShardDataset(tmp_path), ShardDataset(tmp_path, hflip=True)
    x = plain[0][0]
    with torch.random.fork_rng(devices=[]):  # the dataset flips on the global RNG
        torch.manual_seed(0)
        outs = [flipping[0][0] for _ in range(200)]
    # a flip only reorders pixels: exact
    flips = sum(torch.equal(o, x.flip(-1)) for o in outs)
    assert sum(torch.equal(o, x) for o in outs) + flips == 200
    assert 60 < flips < 140  # 200 fair coin flips: std 7, so +-40 is 5.7 sigma (and the seed fixes the draw)


def _folder(root, classes, per_class, size=20):
    for c in classes:
        for k in range(per_class):
            _save(Image.new("RGB", (size, size), (k * 40, 0, 0)), root / c / f"{k}.png")


def test_val_root_is_the_val_split_with_labels_by_class_name(tmp_path):
    _folder(tmp_path / "train", "abc", 4)
    _folder(tmp_path / "val", "c", 3)  # a val folder may lack classes; its labels follow train's class names
    m = prepare_dataset("imagefolder", tmp_path / "out", root=tmp_path / "train", resolution=8, num_images=6,
                        num_classes=3, val_fraction=0.0, shard_rows=4, seed=0, val_root=tmp_path / "val")
    assert m["counts"]["train"] == {"a": 2, "b": 2, "c": 2}  # the cap counts data.root's images only
    assert m["counts"]["val"] == {"a": 0, "b": 0, "c": 3}
    assert m["val_root"] == str(tmp_path / "val")
    val = ShardDataset(tmp_path / "out", "val")
    assert val.labels == [2, 2, 2] and sorted(val.keys) == ["val:c/0.png", "val:c/1.png", "val:c/2.png"]


@pytest.mark.parametrize("val_classes, fraction, source, msg", [
    ("ax", 0.0, "imagefolder", "class(es) x are not among data.root's 3 classes"),
    ("a", 0.1, "imagefolder", "data.val_fraction: given 0.1 with data.val_root set; expected 0"),
    ("a", 0.0, "synthetic", "data.val_root: the synthetic source has no val folder"),
])
def test_val_root_errors_name_the_field(tmp_path, val_classes, fraction, source, msg):
    _folder(tmp_path / "train", "abc", 1)
    _folder(tmp_path / "val", val_classes, 1)
    with pytest.raises(DataError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        prepare_dataset(source, tmp_path / "out", root=tmp_path / "train", resolution=8, num_images=3,
                        num_classes=3, val_fraction=fraction, shard_rows=4, seed=0, val_root=tmp_path / "val")
    assert not (tmp_path / "out" / "manifest.json").exists()
