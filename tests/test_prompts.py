"""Evaluation prompt files and their reference images; the WebDataset reader's benchmark on a few tar shards."""
import numpy as np
import pytest
from PIL import Image

from aligntok.data.prompts import prompt_images, read_prompts, reference_image
from aligntok.data.shards import DataError


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_read_prompts_one_per_line_blank_lines_skipped(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes("\ufeffa red circle\n\n  two blue stars at the left  \r\n\t\ncafé 猫\n".encode())
    assert read_prompts(f) == ["a red circle", "two blue stars at the left", "café 猫"]


@pytest.mark.parametrize("content, expected", [(None, "prompt file not found (text.prompts)"),
                                               (b"", "no prompts"), (b"\n  \n", "no prompts"),
                                               (b"ok\n\xff\xfe bad", "not UTF-8 text (byte 3)")])
def test_bad_prompt_files_are_one_line(tmp_path, content, expected):
    f = tmp_path / "p.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_prompts(f)
    assert one_line(e).startswith(f"{f}: {expected}")


def test_prompt_images_in_natural_order_and_too_few_is_one_line(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("img10.png", "img2.jpg", "img1.png", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "img1.png")
    assert [p.name for p in prompt_images(tmp_path, 3)] == ["img1.png", "img2.jpg", "img10.png"]
    assert [p.name for p in prompt_images(tmp_path, 2)] == ["img1.png", "img2.jpg"]
    with pytest.raises(DataError) as e:
        prompt_images(tmp_path, 4)
    assert "3 reference images for 4 prompts (text.prompt_images)" in one_line(e)
    with pytest.raises(DataError) as e:
        prompt_images(tmp_path / "missing", 1)
    assert "reference image folder not found" in one_line(e)
    assert reference_image(tmp_path / "img1.png", 16).size == (16, 16)
    with pytest.raises(DataError) as e:
        reference_image(tmp_path / "img2.jpg", 16)
    assert one_line(e).startswith(f"{tmp_path / 'img2.jpg'}: bad reference image (not an image)")


def test_bench_webdataset_reports_a_rate(tmp_path):
    from aligntok.bench.webdataset import bench_webdataset

    r = bench_webdataset(workers=1, images=24, resolution=32, folder=tmp_path)
    assert r["images"] == 24 and r["tars"] == 1
    assert r["img_per_s"] > 0 and r["plan_samples_per_s"] > 0 and r["decode_img_per_s_1core"] > 0
