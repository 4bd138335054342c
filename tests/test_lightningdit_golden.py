"""Our LightningDiT, flow-matching objective and sampler against golden tensors recorded once from LightningDiT's
own code (hustvl/LightningDiT; the commit is in the fixture's metadata) by tests/golden/make_lightningdit_golden.py,
whose docstring says what was recorded and how to regenerate it. Runs everywhere, without a checkout;
tests/test_dit_reference.py repeats the DiT comparison live when one is present.

Tolerances. The golden was computed on one CPU (its ATen capability is in the metadata) and these tests run under
any ATEN_CPU_CAPABILITY and thread count, so each bound covers (i) our code against the reference's on the same
kernels, the rounding tests/test_dit_reference.py describes (the same fp32 GEMMs; elementwise work grouped
differently, an ulp or two per op), plus (ii) the same code on other SIMD kernels / reduction orders. Each bound
below states the worst difference measured under ATEN_CPU_CAPABILITY=default, avx2 and OMP_NUM_THREADS=1 (on an
avx512 machine, the golden made with avx512 and one thread) and the margin left; the bugs these tests exist for
(a wrong rotation layout, a missing modulation, a swapped interpolation, a flipped time convention, guidance on the
wrong channels or steps) move the compared values by 1e-2 or more."""
from __future__ import annotations

import importlib.util
import json
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aligntok.diffusion.flow import FlowMatching, sample_timesteps
from aligntok.diffusion.sampler import sample, time_grid

_SPEC = importlib.util.spec_from_file_location("make_lightningdit_golden",
                                               Path(__file__).parent / "golden" / "make_lightningdit_golden.py")
golden = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(golden)

pytestmark = pytest.mark.numeric

# DiT, 2 blocks, outputs of magnitude up to 3.7: measured <= 1.2e-6 apart (avx2; 2 fp32 ulps at 3), i.e. 3.2e-7 of
# the output's largest entry; bound 1e-6 of it (3x margin)
OUT_REL = 1e-6
# gradients, each tensor relative to its own largest entry: measured <= 5.5e-7; bound 2e-6 (3.6x margin), the
# live test's bound
GRAD_REL = 2e-6
# guided output u + s (c - u): the errors of c and u come in scaled by s and |1 - s|, so (s + |1 - s|) times the
# output bound (7x at s = 4): measured 4.1e-6 (default, avx2) of a 2.5e-5 bound
def cfg_rel(s: float) -> float:
    return (s + abs(1 - s)) * OUT_REL


# our seeded draws (torch.randn) against the ones the golden stores: CPU randn fills >= 16 values with a vectorized
# Box-Muller under avx2/avx512 and a scalar one under `default`, a few ulps apart; measured <= 1.3e-6 on values up
# to 6 (ulp 4.8e-7); bound 4e-6 (3x margin). The draws are checked so that a change of torch's RNG reads as such
DRAW_ATOL = 4e-6
# t = sigmoid(z) in float32 (ours) vs float64 rounded once (the reference's numpy path): <= 1 ulp of t < 1, 6e-8,
# measured 6.0e-8 where the draws agree (fewer than 16 normals: the scalar path on every CPU); bound 2.5e-7. Where
# the 64 normals come from the vectorized path, sigmoid' <= 1/4 adds DRAW_ATOL/4: bound 1.25e-6, measured 3.6e-7
T_ATOL, T64_ATOL = 2.5e-7, 2.5e-7 + DRAW_ATOL / 4
# x_t = t x1 + (1 - t) x0: the x0 draw's DRAW_ATOL, plus |x1 - x0| <= 5 times T_ATOL and an ulp: bound 6e-6,
# measured 8.9e-7 (default) and 0 elsewhere
XT_ATOL = DRAW_ATOL + 5 * T_ATOL + 7.2e-7
# MSE and cosine terms, means over 512 entries: one x0 entry off by d moves the MSE by <= 2 |pred - target| d / 512
# (|pred - target| <= 8); even every entry off by DRAW_ATOL in one direction gives 6.4e-5: bound 1e-4, measured
# <= 1.2e-7 (an ulp of the cosine term). A flipped target or a swapped path moves them by more than 1
LOSS_ATOL = 1e-4
# sampler grids: ours in float64, rounded once, the reference's shift in float32 ops (linspace, two products, a sum,
# a quotient: up to ~3 ulps of 6e-8 below 1): measured 1.6e-7 (250 points); bound 4e-7
GRID_ATOL = 4e-7
# sampled x after 8 steps of the stub, |x| <= 4: the float32 grid and step sizes against ours, an ulp per step and
# evaluation: measured <= 9.5e-7; bound 5e-6 (5x margin)
SAMPLE_ATOL = 5e-6
# the DiT sampled with guidance over 4 steps: each evaluation within cfg_rel(4) of |v| <= 3.7, integrated over
# t in [0, 1]: bound 2.6e-5 + SAMPLE_ATOL; measured <= 2.3e-6 (default)
DIT_SAMPLE_ATOL = cfg_rel(4.0) * 3.7 + SAMPLE_ATOL


@pytest.fixture(scope="module")
def fx() -> dict[str, torch.Tensor]:
    return load_file(golden.FIXTURE)


@pytest.fixture(scope="module")
def meta() -> dict[str, str]:
    with safe_open(golden.FIXTURE, framework="pt") as f:
        return f.metadata()


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    diff = float((actual.double() - expected.double()).abs().max())
    print(f"{what}: max diff {diff:.2e} (bound {atol:.1e})")
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    assert diff <= atol, f"{what}: max diff {diff:.3e} > {atol:.1e}"


def test_the_golden_names_its_reference_and_our_parameters(meta):
    assert len(meta["reference_commit"]) == 40 and meta["reference"].endswith("hustvl/LightningDiT")
    shapes = json.loads(meta["parameter_shapes"])
    assert set(shapes) == set(golden.DIT_CONFIGS)
    for name, (hidden, heads, qk_norm, _, _) in golden.DIT_CONFIGS.items():
        ours = {k: list(p.shape) for k, p in golden.build_ours(hidden, heads, qk_norm).named_parameters()}
        assert ours == shapes[name], f"{name}: our parameters are not the ones the golden was made with"


@pytest.mark.parametrize("name", list(golden.DIT_CONFIGS))
def test_dit_outputs_and_gradients_match_the_reference(fx, name):
    hidden, heads, qk_norm, train, seed = golden.DIT_CONFIGS[name]
    model = golden.build_ours(hidden, heads, qk_norm).train(train)
    x, t, y = fx["dit/x"], fx["dit/t"], fx["dit/y"]
    if train:  # our label-dropout draw is the reference's: the same labels dropped under the same seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dropped = model.drop_labels(y) == model.num_classes
        assert torch.equal(dropped, fx[f"dit/{name}/dropped"].bool()) and 0 < int(dropped.sum()) < len(y)
    out, grads = golden.run_dit(model, x, t, y, seed)
    expected = fx[f"dit/{name}/out"]
    assert expected.abs().max() > 1.0
    _close(out, expected, OUT_REL * float(expected.abs().max()), f"{name} out")
    keys = [k for k in golden.GRAD_PARAMS if f"dit/{name}/grad/{k}" in fx]
    assert len(keys) >= 11 and all(k in grads for k in keys)
    for k in keys:
        ref = fx[f"dit/{name}/grad/{k}"]
        scale = float(ref.abs().max())
        assert scale > 0, k
        _close(grads[k], ref, GRAD_REL * scale, f"{name} grad {k}")


def test_dit_forward_with_cfg_matches_the_reference(fx):
    """Guidance on the first 3 channels, the conditional output on the rest; ours builds the null half itself."""
    model = golden.build_ours(128, 4, False).eval()
    x, t, y = fx["dit/x"], fx["dit/t"], fx["dit/y"]
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, golden.DIT_CFG["cfg_scale"], cfg_channels=3)
        cond = model(x, t, y)
    expected = fx["dit/cfg_out"]
    assert (expected[:, :3] - cond[:, :3]).abs().max() > 0.1  # guidance changed the first 3 channels
    _close(out, expected, cfg_rel(golden.DIT_CFG["cfg_scale"]) * float(expected.abs().max()), "forward_with_cfg")


def test_dit_sampling_matches_the_reference_ode(fx):
    """Euler with guidance interval and timestep shift on the DiT itself: the reference's 5 grid points are our
    4 steps."""
    model = golden.build_ours(128, 4, False).eval()
    c = golden.DIT_CFG
    out = sample(model, fx["dit/sample_noise"], fx["dit/sample_y"], steps=c["ref_num_steps"] - 1, method="euler",
                 cfg_scale=c["cfg_scale"], cfg_channels=3, cfg_interval_start=c["cfg_interval_start"],
                 timestep_shift=c["timestep_shift"], null_class=golden.DIT_SHAPE["num_classes"])
    _close(out, fx["dit/sample"], DIT_SAMPLE_ATOL, "dit sample")


class _Recorder:
    def __init__(self, pred):
        self.pred, self.seen = pred, {}

    def __call__(self, xt, t, y):
        self.seen.update(xt=xt.detach().clone(), t=t.detach().clone(), y=y.clone())
        return self.pred.clone()


def test_flow_loss_matches_the_reference_transport(fx):
    """Our draws from a seeded generator are the ones the reference was fed: then t, x_t (t=0 noise, t=1 data),
    the model's inputs and the loss (MSE + cosine over channels, train.py's sum of means) are the reference's."""
    g = torch.Generator().manual_seed(golden.FLOW_SEED)
    _close(torch.randn(golden.FLOW_SHAPE[0], generator=g), fx["flow/z"], DRAW_ATOL, "draw z")
    _close(torch.randn(golden.FLOW_SHAPE, generator=g), fx["flow/x0"], DRAW_ATOL, "draw x0")
    model = _Recorder(fx["flow/pred"])
    loss, logs = FlowMatching("lognormal", use_cosine_loss=True, cosine_weight=1.0).loss(
        model, fx["flow/x1"], fx["flow/y"], generator=torch.Generator().manual_seed(golden.FLOW_SEED))
    _close(model.seen["t"], fx["flow/t"], T_ATOL, "t")
    _close(model.seen["xt"], fx["flow/xt"], XT_ATOL, "x_t")
    assert torch.equal(model.seen["y"], fx["flow/y"])
    assert torch.equal(fx["flow/ut"], fx["flow/x1"] - fx["flow/x0"])  # the reference's target is x1 - x0, exactly
    _close(logs["mse"], fx["flow/mse"].mean(), LOSS_ATOL, "mse")
    _close(logs["cos_loss"], fx["flow/cos"].mean(), LOSS_ATOL, "cosine term")
    _close(loss.detach().reshape(1), fx["flow/total"], LOSS_ATOL, "loss")


def test_logit_normal_timesteps_match_the_reference(fx):
    g = torch.Generator().manual_seed(golden.FLOW_SEED + 1)
    t = sample_timesteps(64, kind="lognormal", std=1.5, generator=g)
    _close(torch.randn(64, generator=torch.Generator().manual_seed(golden.FLOW_SEED + 1)) * 1.5, fx["flow/z64"],
           DRAW_ATOL, "draw z64")
    _close(t, fx["flow/t64"], T64_ATOL, "t64")


@pytest.mark.parametrize("name", list(golden.TIME_GRIDS))
def test_time_grid_is_the_reference_ode_grid(fx, name):
    """The reference's num_sampling_steps N (grid points) is steps = N - 1 here; its shift formula is ours."""
    n, shift = golden.TIME_GRIDS[name]
    ours = torch.tensor(time_grid(n - 1, shift), dtype=torch.float64)
    _close(ours, fx[f"sampler/grid_{name}"].double(), GRID_ATOL, f"grid {name}")


@pytest.mark.parametrize("name", list(golden.SAMPLER_CASES))
def test_sampler_matches_the_reference_ode(fx, name):
    method, num_steps, cfg, start, shift = golden.SAMPLER_CASES[name]
    params = {"W": fx["sampler/W"], "E": fx["sampler/E"]}
    model = partial(golden.velocity_stub, params)
    run = partial(sample, model, fx["sampler/noise"], fx["sampler/y"], steps=num_steps - 1,
                  method="heun" if method == "heun2" else method, cfg_channels=3, timestep_shift=shift,
                  null_class=golden.STUB_CLASSES)
    out = run(cfg_scale=cfg, cfg_interval_start=start)
    _close(out, fx[f"sampler/{name}"], SAMPLE_ATOL, f"sample {name}")
    if cfg != 1.0:  # the golden pins guidance and its interval: unguided, or guided everywhere, is far from it
        assert (run(cfg_scale=1.0) - out).abs().max() > 1e-2
        if start > 0:
            assert (run(cfg_scale=cfg, cfg_interval_start=0.0) - out).abs().max() > 1e-2
    if f"sampler/{name}_raw" in fx:
        # the documented difference: the reference also guides Heun's last corrector, at t == 1
        assert (fx[f"sampler/{name}_raw"] - out).abs().max() > 100 * SAMPLE_ATOL
