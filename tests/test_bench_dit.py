"""`aligntok bench dit`'s comparison with LightningDiT's model code: both models train the same weights (one
set of Parameter objects, one optimizer), every variant is timed in every round, and the ratios are the
per-round ratios of those timings. The model code is a checkout outside this repository (LIGHTNINGDIT_ROOT); the
tests that run it skip without one, the ones about finding it do not."""
import sys

import pytest
import torch

from aligntok.bench import dit as bench
from aligntok.bench import reference
from aligntok.bench.reference import build_reference, reference_key, unavailable_reason
from aligntok.models.dit import build_dit

_MISSING = unavailable_reason()
needs_reference = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


@pytest.mark.parametrize("value", [None, "missing"])
def test_a_missing_checkout_says_how_to_get_it(value, monkeypatch, tmp_path):
    if value is None:
        monkeypatch.delenv(reference.ENV, raising=False)
    else:
        monkeypatch.setenv(reference.ENV, str(tmp_path / value))
    with pytest.raises(reference.ReferenceUnavailable) as e:
        reference.load()
    msg = str(e.value)
    assert "\n" not in msg and reference.ENV in msg and "git clone https://github.com/hustvl/LightningDiT" in msg
    assert unavailable_reason() == msg


def test_a_checkout_inside_the_project_is_refused():
    with pytest.raises(reference.ReferenceUnavailable, match="inside this project"):
        reference.load(reference._PROJECT / "aligntok")


@needs_reference
def test_loading_leaves_import_state_as_it_was():
    path, names = list(sys.path), set(sys.modules)
    mods = reference._import.__wrapped__(reference._root(None))  # a fresh import, not the cached one
    assert sys.path == path and not {n for n in set(sys.modules) - names if n.split(".")[0] in ("models", "fairscale")}
    assert mods.lightningdit.__file__.startswith(str(mods.root))


@needs_reference
def test_reference_shares_our_parameters():
    ours = build_dit("tiny", input_size=4, in_channels=8, num_classes=10)
    ref = build_reference("tiny", input_size=4, in_channels=8, num_classes=10)
    bench._share_weights(ours, ref)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert ref_params[reference_key(name)] is p, name


@needs_reference
def test_compare_reference_times_every_variant_each_round():
    r = bench.compare_reference("tiny", batch=2, steps=1, rounds=2, device=torch.device("cpu"), compiled=False)
    times = r["s_per_step_per_round"]
    assert set(times) == {"ours_eager", "reference_eager"} and all(len(v) == 2 and min(v) > 0 for v in times.values())
    per_round = [b / a for a, b in zip(times["ours_eager"], times["reference_eager"])]
    s = r["speedup"]["ours_eager_over_reference_eager"]
    assert s["min"] == min(per_round) and s["max"] == max(per_round) and s["min"] <= s["median"] <= s["max"]
    assert r["train_flop_per_step"] > 0 and r["ours_eager_img_per_s"] > 0


def test_cli_reference_root_option(tmp_path):
    """`aligntok bench dit --reference-root DIR` looks for the checkout at DIR (not the environment); other targets
    refuse the option with one line."""
    import json
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != reference.ENV}
    cli = [sys.executable, "-m", "aligntok.cli", "bench"]
    wrong = subprocess.run([*cli, "eval", "--reference-root", str(tmp_path)], capture_output=True, text=True, env=env)
    assert wrong.returncode == 2 and "applies to `bench dit` only" in wrong.stdout
    nowhere = tmp_path / "nowhere"
    proc = subprocess.run([*cli, "dit", "--quick", "--reference-root", str(nowhere)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped = [line for line in proc.stderr.splitlines() if "reference comparison skipped" in line]
    assert len(skipped) == 1 and str(nowhere) in skipped[0]
    assert str(nowhere) in json.loads(proc.stdout)["reference_unavailable"]
