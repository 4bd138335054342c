"""Captioned sources in prepare: WebDataset tar shards, img2dataset parquet, synthetic scenes, and the captions of a
prepared split. Sources are written here, with damaged members among them; every source item ends up either as a
row equal to it (caption exact, image decoded as prepare decodes it) or in the manifest's skipped list."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aligntok.data.captions import iter_captions
from aligntok.data.dataset import ShardDataset
from aligntok.data.images import load_image
from aligntok.data.shards import DataError
from aligntok.data.sources import prepare_dataset
from aligntok.data.webdataset import webdataset_items

RES, MAX_PIXELS = 16, 89_478_485


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def picture(rng, fmt="JPEG") -> bytes:
    h, w = rng.integers(20, 48, 2)
    return encode(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), fmt)


def tar_bytes(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def offsets(data: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}


def rows(data_dir, split=None):
    """Every prepared row (both splits unless `split`), in index order."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return [r for s in ([split] if split else ["train", "val"]) for shard in manifest["shards"][s]
            for r in pq.read_table(data_dir / shard["file"]).to_pylist()]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def check_rows_equal_source(data_dir, expected: dict) -> None:
    """Each row's caption is its source caption and its image the source image as prepare decodes it."""
    for row in rows(data_dir):
        image, caption = expected[row["key"]]
        assert row["caption"] == caption and row["label"] == 0 and row["class_name"] == "image"
        assert np.array_equal(pixels(row["image"]), np.asarray(load_image(image, RES, MAX_PIXELS)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four tar shards: good samples (jpg, png, webp), bad ones, one truncated tar, one with a garbage header and
    one that is no tar at all. Returns (root, {key: (image bytes, caption)} of the good ones, {key: reason word})."""
    root, rng = tmp_path_factory.mktemp("wds"), np.random.default_rng(0)
    good, bad = {}, {}
    captions = ["a red circle", "  padded caption \n", "ein Hund im Schnee, café", "猫 on a mat", "x" * 300]
    members = []
    for i in range(12):
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        image, caption = picture(rng, fmt), captions[i % len(captions)]
        members += [(f"{i:06d}.{ext}", image), (f"{i:06d}.txt", caption.encode()), (f"{i:06d}.json", b"{}")]
        good[f"a/00000.tar/{i:06d}"] = (image, caption.strip())
    members += [("000100.jpg", b"garbage, not a jpeg"), ("000100.txt", b"broken")]      # undecodable image
    members += [("000101.jpg", picture(rng)), ("000101.json", b"{}")]                    # no caption
    members += [("000102.txt", b"caption without an image")]                             # no image
    members += [("sub/000103.jpg", picture(rng)), ("sub/000103.txt", b"in a folder")]     # key with a folder
    good["a/00000.tar/sub/000103"] = (members[-2][1], "in a folder")
    bad.update({"a/00000.tar/000100": "not an image", "a/00000.tar/000101": "no caption",
                "a/00000.tar/000102": "no image member"})
    (root / "a").mkdir()
    (root / "a" / "00000.tar").write_bytes(tar_bytes(members))

    cut = [(f"{i:06d}.{e}", picture(rng) if e == "jpg" else f"cut {i}".encode()) for i in range(200, 206)
           for e in ("jpg", "txt")]
    data = tar_bytes(cut)
    _, start, size = offsets(data)["000204.jpg"]
    (root / "b").mkdir()
    (root / "b" / "00001.tar").write_bytes(data[:start + size // 2])      # ends inside 000204.jpg
    good.update({f"b/00001.tar/{i:06d}": (cut[2 * (i - 200)][1], f"cut {i}") for i in range(200, 204)})
    bad["b/00001.tar/000204"] = "truncated (the tar ends inside 000204.jpg)"

    garbled = [(f"{i:06d}.{e}", picture(rng, "PNG") if e == "png" else f"g {i}".encode()) for i in range(300, 304)
               for e in ("png", "txt")]
    data = bytearray(tar_bytes(garbled))
    header = offsets(bytes(data))["000302.png"][0]
    data[header:header + 512] = b"\x7f" * 512                             # a garbage header: tarfile stops quietly
    (root / "b" / "00002.tar").write_bytes(bytes(data))
    good.update({f"b/00002.tar/{i:06d}": (garbled[2 * (i - 300)][1], f"g {i}") for i in (300, 301)})
    bad["b/00002.tar"] = f"damaged tar (no valid header at byte {header})"
    (root / "b" / "00003.tar").write_text("this is not a tar archive")
    bad["b/00003.tar"] = "not a readable tar"
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.tar").write_bytes(b"")                          # hidden folders are not read
    return root, good, bad


def wds(out, root, **kw):
    args = dict(root=root, resolution=RES, num_images=None, num_classes=1, val_fraction=0.3, shard_rows=4, seed=0,
                workers=1, row_group_rows=2)
    return prepare_dataset("webdataset", out, **{**args, **kw})


def test_webdataset_rows_equal_the_source_and_every_bad_sample_is_listed(tmp_path, shards):
    root, good, bad = shards
    _, items = webdataset_items(root)
    assert all(isinstance(x, (str, int, list)) for _, _, spec in items for x in spec)  # offsets, never bytes
    m = wds(tmp_path, root)
    assert m["captioned"] is True and m["class_names"] == ["image"] and m["num_classes"] == 1
    assert m["num_images"]["train"] > 0 and m["num_images"]["val"] > 0
    check_rows_equal_source(tmp_path, good)
    kept = [r["key"] for r in rows(tmp_path)]
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    assert sorted(kept) == sorted(good) and sorted(skipped) == sorted(bad)  # nothing else lost
    assert all(reason in skipped[key] for key, reason in bad.items()), skipped


def test_webdataset_parallel_resume_rebuilds_only_what_is_missing(tmp_path, shards):
    root = shards[0]
    ref = wds(tmp_path / "ref", root)
    out, work = tmp_path / "out", tmp_path / "work"
    wds(out, root, work_dir=work)
    built = sorted(work.glob("*.parquet"))
    (work / ".progress" / f"{built[0].name}.json").unlink()       # killed between shard and sidecar
    built[1].unlink()                                             # killed before the shard was published
    kept = {p.name: p.stat().st_ino for p in built[2:]}
    again = wds(out, root, work_dir=work, workers=2)
    assert again == {**ref, "root": str(root)}
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == {
        p.name: p.read_bytes() for p in (tmp_path / "ref").glob("*.parquet")}
    assert {n: (work / n).stat().st_ino for n in kept} == kept


def test_captions_in_index_order_and_reshard_keeps_content_and_captions(tmp_path, shards):
    root, good, _ = shards
    m = wds(tmp_path / "w", root)
    for split in ("train", "val"):
        ds = ShardDataset(tmp_path / "w", split)
        assert list(iter_captions(tmp_path / "w", split)) == [good[k][1] for k in ds.keys]
        assert ds[0][0].shape == (3, RES, RES)
    again = prepare_dataset("parquet", tmp_path / "p", root=tmp_path / "w", resolution=RES, num_images=None,
                            num_classes=1, val_fraction=0.3, shard_rows=3, seed=0, task="text")
    assert again["captioned"] and again["content_hash"] == m["content_hash"]
    assert list(iter_captions(tmp_path / "p", "train")) == list(iter_captions(tmp_path / "w", "train"))


def test_class_data_has_no_captions_and_text_task_refuses_it(tmp_path):
    args = dict(root=None, resolution=RES, num_images=12, num_classes=3, val_fraction=0.0, shard_rows=8, seed=0)
    m = prepare_dataset("synthetic", tmp_path / "c", **args)
    assert m["captioned"] is False
    assert pq.read_schema(tmp_path / "c" / "train-00000.parquet").names == ["key", "image", "label", "class_name"]
    with pytest.raises(DataError, match=r"c: no captions .*task text") as e:
        iter_captions(tmp_path / "c", "train")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="holds no captions.*task text"):
        prepare_dataset("parquet", tmp_path / "p", **{**args, "root": tmp_path / "c"}, task="text")


def img2dataset_table(rng, n_good: int, caption_column="caption"):
    good, bad, rows_ = {}, {}, []
    for i in range(n_good):
        image = picture(rng)
        rows_.append({"key": f"{i:09d}", caption_column: f"photo {i}", "status": "success", "error_message": None,
                      "jpg": image, "url": f"http://x/{i}.jpg"})
        good[f"{i:09d}"] = (image, f"photo {i}")
    extra = [("failed", {"status": "failed_to_download", "error_message": "HTTP Error 404: Not Found", "jpg": None},
              "status 'failed_to_download' (HTTP Error 404: Not Found)"),
             ("nobytes", {"jpg": None}, "no image bytes (column jpg is null)"),
             ("corrupt", {"jpg": b"\xff\xd8\xff broken"}, "corrupt"),
             ("nocaption", {caption_column: None}, "no caption (null)")]
    for key, change, reason in extra:
        rows_.append({"key": key, caption_column: "c", "status": "success", "error_message": None,
                      "jpg": picture(rng), "url": "u", **change})
        bad[key] = reason
    return pa.Table.from_pylist(rows_), good, bad


def test_img2dataset_rows_equal_the_source_and_failed_rows_are_listed(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    good, bad = {}, {}
    for f in ("00000", "00001"):
        table, g, b = img2dataset_table(rng, 7)
        pq.write_table(table, src / f"{f}.parquet", row_group_size=3)
        good.update({f"{f}.parquet/{k}": v for k, v in g.items()})
        bad.update({f"{f}.parquet/{k}": v for k, v in b.items()})
    (src / "00000_stats.json").write_text("{}")
    m = prepare_dataset("img2dataset", tmp_path / "out", root=src, resolution=RES, num_images=None, num_classes=1,
                        val_fraction=0.3, shard_rows=4, seed=0, row_group_rows=2, task="text")
    assert m["captioned"] and m["source"] == "img2dataset"
    check_rows_equal_source(tmp_path / "out", good)
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    assert sorted(r["key"] for r in rows(tmp_path / "out")) == sorted(good) and sorted(skipped) == sorted(bad)
    assert all(reason in skipped[key] for key, reason in bad.items()), skipped
    # a cap keeps the first usable rows in source order, topping up the skipped ones
    capped = prepare_dataset("img2dataset", tmp_path / "cap", root=src, resolution=RES, num_images=9, num_classes=1,
                             val_fraction=0.0, shard_rows=4, seed=0)
    assert capped["num_images"]["train"] == 9 and len(capped["skipped"]) == 4


def test_img2dataset_caption_column_and_one_line_errors(tmp_path):
    table, good, _ = img2dataset_table(np.random.default_rng(2), 3, caption_column="TEXT")
    (tmp_path / "src").mkdir()
    pq.write_table(table, tmp_path / "src" / "a.parquet")
    args = dict(resolution=RES, num_images=None, num_classes=1, val_fraction=0.0, shard_rows=8, seed=0)
    m = prepare_dataset("img2dataset", tmp_path / "ok", root=tmp_path / "src", caption_column="TEXT", **args)
    assert [r["caption"] for r in rows(tmp_path / "ok")] == [c for _, c in good.values()]
    assert m["num_images"]["train"] == 3
    with pytest.raises(DataError, match=r"a.parquet: no column 'caption' \(data.caption_column\)"):
        prepare_dataset("img2dataset", tmp_path / "no", root=tmp_path / "src", **args)
    pq.write_table(table.drop(["jpg"]), tmp_path / "src" / "a.parquet")   # a webdataset run's metadata parquet
    with pytest.raises(DataError, match=r"a.parquet: no image-bytes column") as e:
        prepare_dataset("img2dataset", tmp_path / "no", root=tmp_path / "src", caption_column="TEXT", **args)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="no \\*.tar shards found"):
        prepare_dataset("webdataset", tmp_path / "no", root=tmp_path / "src", **args)


def test_scenes_rows_are_draw_scene_of_their_index(tmp_path):
    from aligntok.data.scenes import SCENE_CLASSES, draw_scene, scene_attributes, scene_label

    m = prepare_dataset("scenes", tmp_path, root=None, resolution=32, num_images=20, num_classes=1,
                        val_fraction=0.2, shard_rows=8, seed=3, task="text")
    assert m["captioned"] and m["class_names"] == list(SCENE_CLASSES) and sum(m["num_images"].values()) == 20
    prepared = rows(tmp_path)
    assert sorted(int(r["key"].removeprefix("scene-")) for r in prepared) == list(range(20))
    for r in prepared:
        i = int(r["key"].removeprefix("scene-"))
        image, caption = draw_scene(i, 32, 3)
        assert r["caption"] == caption and r["label"] == scene_label(scene_attributes(i, 3))
        assert r["class_name"] == SCENE_CLASSES[r["label"]]
        assert np.array_equal(pixels(r["image"]), np.asarray(image.convert("RGB")))
