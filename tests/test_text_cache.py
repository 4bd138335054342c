"""The text cache: a round trip against direct encoding, resume after a real SIGKILL of a caching process, a cache of
another encoder refused, corrupt shards in one line, and the cache-text stage for both tasks."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from aligntok.bench.text import bench_text_cache, synthetic_captions
from aligntok.config import Params
from aligntok.data.captions import iter_captions
from aligntok.data.text_cache import TextCache, TextCacheError, cache_manifest, encode_captions, shard_name
from aligntok.io import write_json_atomic
from aligntok.models.text_encoder import PACKAGED, TextEncoder
from aligntok.stages import text as stage
from tests.conftest import ROOT, single_thread

# A cached state against the same caption encoded alone in float32: float16 rounds to within 2^-11 of the value
# (round to nearest, 11 significant bits), and a caption's states move by < 5e-5 with its batch (measured 0 on one
# thread; see tests/test_text_encoder.py). A row from the wrong caption differs by ~1.
FP16 = dict(rtol=2.0 ** -11, atol=5e-5)
N, ROWS, BATCH = 13, 5, 4  # three shards: 5, 5, 3 captions


@pytest.fixture(scope="module")
def minilm():
    with single_thread():
        yield TextEncoder.load(PACKAGED, 32)


def write_cache(folder, enc, captions, rows=ROWS):
    records, encoded, reused = encode_captions(enc, lambda block: [captions[i] for i in block],
                                               range(-(-len(captions) // rows)), folder, n=len(captions),
                                               shard_rows=rows, batch_size=BATCH, show_progress=False)
    write_json_atomic(folder / "manifest.json", cache_manifest(enc, len(captions), records))
    return encoded, reused


def assert_matches_direct_encoding(cache, enc, captions):
    """Every row against its own caption encoded alone: an off-by-one shared by two runs is caught here."""
    assert len(cache) == len(captions) and cache.dim == enc.dim and cache.max_tokens == enc.max_tokens
    for i, caption in enumerate(captions):
        ref_h, ref_m = enc.encode([caption])
        hidden, mask = cache.get(i)
        assert hidden.dtype == torch.float32 and mask.dtype == torch.bool and hidden.shape == (32, enc.dim)
        assert torch.equal(mask, ref_m[0])
        assert_close(hidden, ref_h[0], **FP16)


def test_round_trip_equals_direct_encoding_and_maps_lazily(minilm, tmp_path):
    captions = synthetic_captions(N, seed=1)
    assert write_cache(tmp_path, minilm, captions) == (N, 0)
    shard = load_file(str(tmp_path / shard_name(0)))
    assert shard["hidden"].dtype == torch.float16 and shard["hidden"].shape == (ROWS, 32, 384)
    assert shard["lengths"].dtype == torch.int32 and torch.equal(shard["indices"], torch.arange(ROWS))
    cache = TextCache(tmp_path, minilm.hash)
    assert cache.encoder_hash == minilm.hash and cache.dir == tmp_path
    assert_matches_direct_encoding(cache, minilm, captions)
    assert all(isinstance(m["hidden"], np.memmap) for m in cache._shards())  # mapped, not loaded
    assert len(pickle.dumps(cache)) < 20_000  # a DataLoader worker gets paths, never the states
    copy = pickle.loads(pickle.dumps(cache))
    assert copy._maps is None and torch.equal(copy.get(N - 1)[0], cache.get(N - 1)[0])
    with pytest.raises(IndexError):
        cache.get(N)


def test_resume_redoes_only_missing_torn_or_changed_shards(minilm, tmp_path):
    captions = synthetic_captions(N, seed=2)
    write_cache(tmp_path, minilm, captions)
    kept = (tmp_path / shard_name(0)).stat().st_ino
    (tmp_path / shard_name(2)).unlink()  # killed before the last shard
    (tmp_path / shard_name(1)).write_bytes((tmp_path / shard_name(1)).read_bytes()[:100])  # a torn file
    assert write_cache(tmp_path, minilm, captions) == (ROWS + 3, 1)
    assert (tmp_path / shard_name(0)).stat().st_ino == kept
    captions[7] = "a changed caption"  # the same images recaptioned: that shard is redone
    assert write_cache(tmp_path, minilm, captions) == (ROWS, 2)
    assert_matches_direct_encoding(TextCache(tmp_path, minilm.hash), minilm, captions)
    other = TextEncoder(minilm.model, minilm.tokenizer, 32, "cpu", PACKAGED, minilm.folder, "another-encoder")
    assert write_cache(tmp_path, other, captions) == (N, 0)  # nothing of another encoder is reused


CHILD = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from aligntok.bench.text import synthetic_captions
from aligntok.data.text_cache import encode_captions
from aligntok.models.text_encoder import TextEncoder
n, rows, batch = (int(a) for a in sys.argv[2:5])
captions = synthetic_captions(n, seed=5)
enc = TextEncoder.load("all-MiniLM-L6-v2", 32)
def captions_of(block):
    time.sleep(0.1)  # stretches the run so the kill lands mid-cache
    return [captions[i] for i in block]
encode_captions(enc, captions_of, range(-(-n // rows)), Path(sys.argv[1]), n=n, shard_rows=rows, batch_size=batch,
                show_progress=False)
"""


def test_sigkill_mid_cache_then_resume_reuses_finished_shards(minilm, tmp_path):
    """A caching process killed (SIGKILL) once a seeded number of its 30 shards exist: the rerun keeps every finished
    shard (never rewritten), encodes the rest, and the cache equals an uninterrupted run's byte for byte and the
    captions encoded directly within float16 rounding."""
    n, rows, total = 60, 2, 30
    captions = synthetic_captions(n, seed=5)
    with single_thread():
        write_cache(tmp_path / "reference", minilm, captions, rows)  # the uninterrupted run
    work = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(work), str(n), str(rows), str(BATCH)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    target = 3 + int(torch.randint(0, 5, (), generator=torch.Generator().manual_seed(0)))
    try:
        deadline = time.monotonic() + 300
        while len(list(work.glob("text-*.safetensors"))) < target:
            assert proc.poll() is None, f"caching ended before the kill: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no shard written in time"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    done = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.glob("text-*.safetensors")}
    assert target <= len(done) < total, (target, len(done))
    with single_thread():
        encoded, reused = write_cache(work, minilm, captions, rows)
        assert reused == len(done) and encoded == n - rows * len(done)
        assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done} == done  # not rewritten
        assert not list(work.glob(".*.tmp"))
        for k in range(total):
            assert (work / shard_name(k)).read_bytes() == (tmp_path / "reference" / shard_name(k)).read_bytes()
        assert_matches_direct_encoding(TextCache(work, minilm.hash), minilm, captions)


def test_a_cache_of_another_encoder_is_refused(minilm, tmp_path):
    write_cache(tmp_path, minilm, synthetic_captions(N, seed=3))
    with pytest.raises(TextCacheError, match=f"made by encoder {minilm.hash} .*current encoder is other; re-run"):
        TextCache(tmp_path, "other")
    shard = tmp_path / shard_name(1)  # one shard swapped in from another encoder's cache
    save_file(load_file(str(shard)), str(shard), metadata={"encoder_hash": "other"})
    with pytest.raises(TextCacheError, match=f"{shard_name(1)}: shard made by encoder other; expected") as e:
        TextCache(tmp_path, minilm.hash)
    assert "\n" not in str(e.value)


def test_corrupt_or_missing_shards_and_manifests_are_one_line(minilm, tmp_path):
    write_cache(tmp_path, minilm, synthetic_captions(N, seed=4))
    shard = tmp_path / shard_name(1)
    good = shard.read_bytes()
    cases = [(lambda: shard.write_bytes(good[:1000]), r"text-00001.safetensors: tensor 'hidden' offsets .* not match"),
             (lambda: shard.write_bytes(b"\x00" * 8), "text-00001.safetensors: header length 0 does not fit"),
             (lambda: shard.unlink(), "text-00001.safetensors: file not found; expected a safetensors text shard"),
             (lambda: save_file({"hidden": torch.zeros(5, 32, 384)}, str(shard)), "tensor 'hidden' is float32")]
    for damage, message in cases:
        damage()
        with pytest.raises(TextCacheError, match=message) as e:
            TextCache(tmp_path)
        assert "\n" not in str(e.value) and "re-run `aligntok cache-text`" in str(e.value)
        shard.write_bytes(good)
    TextCache(tmp_path)  # repaired
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(TextCacheError, match="manifest.json: text cache manifest not found; run `aligntok cache"):
        TextCache(tmp_path)
    write_json_atomic(tmp_path / "manifest.json", {"task": "class", "reason": "r"})
    with pytest.raises(TextCacheError, match="task 'class'; expected a text cache"):
        TextCache(tmp_path)


def make_captioned_data(folder: Path, captions: list[str], per_file: int = 4) -> None:
    """A prepared captioned data set as `aligntok prepare` lays it out: parquet shards with a caption column."""
    folder.mkdir(parents=True)
    files = []
    for f, a in enumerate(range(0, len(captions), per_file)):
        part = captions[a:a + per_file]
        table = pa.table({"key": [f"k{a + i}" for i in range(len(part))], "image": [b""] * len(part),
                          "label": [0] * len(part), "class_name": [""] * len(part), "caption": part})
        pq.write_table(table, folder / f"train-{f:05d}.parquet", row_group_size=3)
        files.append({"file": f"train-{f:05d}.parquet", "rows": len(part)})
    (folder / "manifest.json").write_text(json.dumps({
        "source": "scenes", "captioned": True, "shards": {"train": files, "val": []}, "class_names": [],
        "num_classes": 0, "resolution": 32, "counts": {}, "content_hash": "c" * 64}))


def test_a_rank_block_gets_its_captions_past_the_others(tmp_path):
    captions = synthetic_captions(10, seed=6)
    make_captioned_data(tmp_path / "d", captions)
    of = stage.SequentialCaptions(iter_captions(tmp_path / "d", "train"), "d")
    assert of([5, 6]) == captions[5:7] and of([9]) == captions[9:]  # a rank's run of shards, past the others
    with pytest.raises(TextCacheError, match=r"text-00002.safetensors: got 0 captions for images 10..11; expected 2"):
        encode_captions(None, of, [2], tmp_path / "c", n=12, shard_rows=5, batch_size=4)  # the split ran out


def test_cache_text_stage_for_both_tasks(minilm, tmp_path, isolated_mlflow, monkeypatch, capsys, one_thread):
    # the stage runs inside stage_run with tracking off: an MLflow store costs ~20 s here, and what reaches it
    # (write_metrics' numbers) is tracking's own tests' business
    monkeypatch.setenv("ALIGNTOK_TRACKING", "0")
    params = Params()
    assert stage.run(params, None) == 0  # class task: no captions, a manifest saying so
    assert json.loads((tmp_path / "outputs/text/manifest.json").read_text())["task"] == "class"
    captions = synthetic_captions(10, seed=7)
    make_captioned_data(tmp_path / "data" / "cap", captions)
    params = Params(task="text", data={"source": "scenes", "name": "cap"}, text={"batch_size": BATCH})
    monkeypatch.setattr(stage, "SHARD_ROWS", 4)  # three shards: 4, 4, 2
    assert stage.run(params, None) == 0
    cache = TextCache(tmp_path / "outputs" / "text", minilm.hash)
    assert cache.manifest["data_content_hash"] == "c" * 64 and len(cache.manifest["shards"]) == 3
    assert_matches_direct_encoding(cache, minilm, captions)
    work = next((tmp_path / "checkpoints" / "cache-text").iterdir())
    assert work.name == f"{minilm.hash}-{'c' * 12}"
    assert (work / shard_name(0)).stat().st_ino == (cache.dir / shard_name(0)).stat().st_ino  # hard links
    metrics = json.loads((tmp_path / "outputs/metrics/cache-text.json").read_text())
    assert metrics["captions"] == metrics["encoded_this_run"] == 10 and metrics["captions_per_s"] > 0
    capsys.readouterr()
    assert stage.run(params, None) == 0
    assert "reused 3 of 3 finished shards" in capsys.readouterr().out
    assert json.loads((tmp_path / "outputs/metrics/cache-text.json").read_text())["encoded_this_run"] == 0


def test_bench_text_cache_reports_captions_per_second(one_thread):
    assert bench_text_cache(captions=16, batch_size=8, shard_rows=8) > 0
