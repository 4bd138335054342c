"""`aligntok bench dit`'s comparison with LightningDiT's model code: both models train the same weights (one
set of Parameter objects, one optimizer), every variant is timed in every round, and the ratios are the
per-round ratios of those timings."""
import torch

from aligntok.bench import dit as bench
from aligntok.bench.lightningdit_reference import build_reference, reference_key
from aligntok.models.dit import build_dit


def test_reference_shares_our_parameters():
    ours = build_dit("tiny", input_size=4, in_channels=8, num_classes=10)
    ref = build_reference("tiny", input_size=4, in_channels=8, num_classes=10)
    bench._share_weights(ours, ref)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert ref_params[reference_key(name)] is p, name


def test_compare_reference_times_every_variant_each_round():
    r = bench.compare_reference("tiny", batch=2, steps=1, rounds=2, device=torch.device("cpu"), compiled=False)
    times = r["s_per_step_per_round"]
    assert set(times) == {"ours_eager", "reference_eager"} and all(len(v) == 2 and min(v) > 0 for v in times.values())
    per_round = [b / a for a, b in zip(times["ours_eager"], times["reference_eager"])]
    s = r["speedup"]["ours_eager_over_reference_eager"]
    assert s["min"] == min(per_round) and s["max"] == max(per_round) and s["min"] <= s["median"] <= s["max"]
    assert r["train_flop_per_step"] > 0 and r["ours_eager_img_per_s"] > 0
