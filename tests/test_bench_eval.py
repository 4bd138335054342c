"""The paper-scale evaluate estimate: its counts follow the sampler's grid and guidance interval, and its
arithmetic (samples x FLOPs per sample / rate / GPUs) holds."""
import pytest

from aligntok.bench.eval import paper_estimate


def test_paper_estimate_counts_and_arithmetic():
    e = paper_estimate(gpus=8, flop_s=1e15, num_samples=1000, steps=10, cfg_interval_start=0.0, timestep_shift=0.0)
    assert e["guided_steps"] == 10  # start 0 guides every evaluation (t < 1 on every interval's left end)
    assert e["dit_forwards_per_sample"] == {"no_cfg": 10, "cfg": 20}
    # XL/1 at 256 tokens: of its 675M parameters ~450M act on every token (the 223M of adaLN act once per image):
    # 2 x 450M x 256 = 230 GFLOP, plus attention 4 x 256^2 x 1152 x 28 = 8.5 GFLOP -> ~238 by hand
    assert 230 < e["dit_forward_gflop_per_image"] < 245
    # backward = 2 forwards, less the patch embedding's input gradient (the latents need none): 3x within 1e-4
    assert e["dit_train_gflop_per_image"] == pytest.approx(3 * e["dit_forward_gflop_per_image"], rel=1e-4)
    per = {k: v * 1e12 for k, v in e["tflop_per_sample"].items()}
    assert e["total_pflop"] * 1e15 == pytest.approx(1000 * (per["no_cfg"] + per["cfg"]), rel=1e-12)
    assert e["wall_hours"] * 8 * 3600 * 1e15 == pytest.approx(e["total_pflop"] * 1e15, rel=1e-12)
    shifted = paper_estimate(flop_s=1e15, num_samples=1, steps=249, cfg_interval_start=0.1, timestep_shift=0.3)
    assert 0 < shifted["guided_steps"] < 249  # the shift keeps the early (noisy) steps below the interval
