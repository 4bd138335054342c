"""Golden tensors from LightningDiT's own code (hustvl/LightningDiT), made once and committed as
tests/golden/lightningdit.safetensors, so that tests/test_lightningdit_golden.py checks our DiT, flow objective and
sampler against the reference on every run, without a checkout (tests/test_dit_reference.py does the live
comparison when one is present).

Regenerate, from the project root, with a checkout of hustvl/LightningDiT outside this project (its
transport/integrators.py imports torchdiffeq, which this project does not depend on: install it beside, e.g.
`pip install --target /tmp/refdeps torchdiffeq==0.2.5` and add PYTHONPATH=/tmp/refdeps):

    LIGHTNINGDIT_ROOT=/path/to/LightningDiT PYTHONPATH=/tmp/refdeps .venv/bin/python tests/golden/make_lightningdit_golden.py

The checkout must be a clean git tree; its commit, and the torch / numpy / scipy / torchdiffeq versions used, are
written into the file's metadata. Nothing of the reference is copied here: it is imported from the checkout.

What is recorded (all float32 unless said; every input is stored, or derived below without torch's RNG):
(a) dit/<config>/: the reference LightningDiT's output and the gradients of a few small representative tensors
    (biases, norm weights, the patch embedding, the label table, the final projection) of mean(out^2), for 2 blocks
    at hidden 128 / 4 heads and 2 heads, 144 / 2 heads, and 128 / 4 heads with QK-norm; the two 2-head configs in
    training mode under a seed whose label-dropout draw drops one of the 3 labels. The weights are ours, filled by
    fill_weights (Python's `random`, whose random() sequence for a given seed Python guarantees across versions,
    not torch's RNG: torch's CPU randn differs by an ulp between ATEN_CPU_CAPABILITY=default and avx2) and copied
    into the reference with aligntok.bench.reference.load_ours_into_reference. dit/cfg_out: the reference's
    forward_with_cfg (guidance on 3 channels) on [x, x] and [y, null], first half. dit/sample: the reference's
    `ode` (Euler, 5 grid points, shift 0.3) with forward_with_cfg and its guidance interval, from stored noise.
(b) flow/: the reference's Transport (Linear path, velocity, use_lognorm, use_cosine_loss) training_losses with its
    random draws replaced by stored ones in the order our FlowMatching.loss draws them from a seeded generator
    (logit-normal normals z, then the noise x0): t, x_t and the model input, the per-sample MSE and cosine terms and
    train.py's total (mean of each, summed); and sample_logit_normal over 64 stored normals.
(c) sampler/: the reference's `ode` (transport/integrators.py through Sampler.sample_ode, torchdiffeq's fixed-grid
    euler / heun2) with forward_with_cfg (cfg on 3 channels, interval) on a tiny analytic velocity model
    (velocity_stub), from stored noise, and the reference's time grids. Our `steps` counts intervals: the reference's
    num_steps N is steps = N - 1 here. Heun with guidance: our sampler leaves t == 1 unguided (the reference guides
    its last corrector there; see aligntok/diffusion/sampler.py), so heun_cfg is recorded with the reference's own
    interval switched off at that one evaluation (cfg_interval_start above 1 there: the reference then returns its
    conditional output), and heun_cfg_raw, the reference as it is, for the test to show the difference is real.
"""
from __future__ import annotations

import importlib
import json
import math
import random
import subprocess
import sys
import zlib
from pathlib import Path

import torch

from aligntok.models.dit import build_dit

FIXTURE = Path(__file__).with_name("lightningdit.safetensors")
WEIGHT_SEED = 20250612

# (a) the configurations of tests/test_dit_reference.py: name -> (hidden, heads, qk_norm, train, dropout seed)
DIT_CONFIGS = {
    "h128x4": (128, 4, False, False, None),
    "h128x2_train": (128, 2, False, True, 3),  # torch.manual_seed(3); rand(3) < 0.1 drops label 0
    "h144x2_train": (144, 2, False, True, 14),  # seed 14 drops label 1
    "h128x4_qknorm": (128, 4, True, False, None),
}
DIT_SHAPE = dict(input_size=8, in_channels=8, num_classes=10, depth=2)
GRAD_PARAMS = ("x_embedder.weight", "t_embedder.0.bias", "y_embedder.weight", "blocks.0.norm1.weight",
               "blocks.0.attn.qkv.bias", "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight",
               "blocks.0.adaLN_modulation.1.bias", "blocks.1.attn.proj.bias", "blocks.1.mlp.w12.bias",
               "blocks.1.mlp.w3.bias", "final_modulation.1.bias", "final_linear.weight")
DIT_CFG = dict(cfg_scale=4.0, cfg_interval_start=0.11, timestep_shift=0.3, ref_num_steps=5)  # dit/cfg_out, dit/sample

# (b)
FLOW_SEED = 7
FLOW_SHAPE = (4, 8, 4, 4)

# (c): name -> (reference sampling_method, reference num_steps, cfg_scale, cfg_interval_start, timestep_shift)
STUB_CHANNELS, STUB_CLASSES = 5, 4
SAMPLER_CASES = {
    "euler_cfg": ("euler", 9, 4.0, 0.11, 0.3),
    "euler_cfg_all": ("euler", 9, 1.5, 0.0, 0.0),
    "heun_nocfg": ("heun2", 9, 1.0, 0.0, 0.3),
    "heun_cfg": ("heun2", 9, 4.0, 0.3, 0.0),
}
TIME_GRIDS = {"250_shift0.3": (250, 0.3), "9_shift0.3": (9, 0.3), "9_noshift": (9, 0.0)}


def fill_weights(model: torch.nn.Module, seed: int = WEIGHT_SEED) -> None:
    """Every parameter from Python's random.Random (seeded per parameter name, so independent of registration order):
    matrices uniform with variance 1/fan_in, biases uniform in +-0.1, norm weights 1 +- 0.1. No adaLN-Zero zeros:
    every path and every gradient carries signal. Computed in float64, rounded once to the parameter's dtype."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            rng = random.Random(seed * 1_000_003 + zlib.crc32(name.encode()))
            u = torch.tensor([rng.random() for _ in range(p.numel())], dtype=torch.float64).view(p.shape) * 2 - 1
            if p.dim() >= 2:
                value = u * math.sqrt(3.0 / p[0].numel())
            elif name.endswith("bias"):
                value = 0.1 * u
            else:
                value = 1 + 0.1 * u
            p.copy_(value.to(p.dtype))


def uniform(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    """A float32 tensor uniform in +-scale from Python's random (stable across versions and CPUs)."""
    rng = random.Random(seed)
    n = math.prod(shape)
    return ((torch.tensor([rng.random() for _ in range(n)], dtype=torch.float64) * 2 - 1) * scale).view(shape).float()


def velocity_stub(params: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A tiny analytic velocity model, per sample (no batch coupling), nonlinear in x, dependent on t and strongly
    on the label (so guidance matters), with the null class as label STUB_CLASSES:
    v = tanh(sum_c W[o, c] x_c) (1 - t/2) + E[y] (1/2 + t) - x/4."""
    tb = t.view(-1, 1, 1, 1)
    mixed = (params["W"][None, :, :, None, None] * x[:, None]).sum(2)
    return torch.tanh(mixed) * (1 - 0.5 * tb) + params["E"][y][:, :, None, None] * (0.5 + tb) - 0.25 * x


def stub_params() -> dict:
    return {"W": uniform((STUB_CHANNELS, STUB_CHANNELS), 11, 1.0),
            "E": uniform((STUB_CLASSES + 1, STUB_CHANNELS), 12, 1.5)}


def build_ours(hidden: int, heads: int, qk_norm: bool):
    model = build_dit("tiny", hidden_size=hidden, num_heads=heads, qk_norm=qk_norm, **DIT_SHAPE)
    fill_weights(model)
    return model


def dit_inputs():
    x = uniform((3, DIT_SHAPE["in_channels"], 8, 8), 1, 2.0)
    t = torch.tensor([0.05, 0.5, 0.93])
    y = torch.tensor([0, 4, 9])
    return x, t, y


def run_dit(model, x, t, y, dropout_seed: int | None):
    """Output and gradients of mean(out^2) (label dropout drawn from torch.manual_seed(dropout_seed))."""
    model.zero_grad(set_to_none=True)
    with torch.compiler.set_stance("force_eager"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if dropout_seed is None else dropout_seed)
        out = model(x, t, y)
    out.pow(2).mean().backward()
    return out.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------------------------
# generation (needs the checkout)

def _commit(root: Path) -> str:
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                           check=True).stdout.strip()
    if dirty:
        sys.exit(f"{root} has local changes; the golden must come from a committed reference:\n{dirty}")
    return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _import_transport(root: Path):
    saved = list(sys.path)
    sys.path.insert(0, str(root))
    try:
        return (importlib.import_module("transport"), importlib.import_module("transport.transport"),
                importlib.import_module("transport.integrators"))
    finally:
        sys.path[:] = saved


def _gen_dit(ref_mod, out: dict) -> None:
    from aligntok.bench.reference import build_reference, load_ours_into_reference, reference_key
    x, t, y = dit_inputs()
    out.update({"dit/x": x, "dit/t": t, "dit/y": y})
    for name, (hidden, heads, qk_norm, train, seed) in DIT_CONFIGS.items():
        ours = build_ours(hidden, heads, qk_norm)
        ref = build_reference("tiny", hidden_size=hidden, num_heads=heads, use_qknorm=qk_norm, **DIT_SHAPE)
        load_ours_into_reference(ours, ref)
        ours.train(train), ref.train(train)
        ref_out, ref_grads = run_dit(ref, x, t, y, seed)
        our_out, our_grads = run_dit(ours, x, t, y, seed)
        out[f"dit/{name}/out"] = ref_out
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                dropped = torch.rand(3) < ref.y_embedder.dropout_prob  # the draw token_drop makes
            assert 0 < int(dropped.sum()) < 3, f"seed {seed} should drop some, not all, labels"
            out[f"dit/{name}/dropped"] = dropped.to(torch.uint8)
        for k in GRAD_PARAMS:
            if k in our_grads:
                out[f"dit/{name}/grad/{k}"] = ref_grads[reference_key(k)]
                print(f"  {name} {k}: ours-ref {float((our_grads[k] - out[f'dit/{name}/grad/{k}']).abs().max()):.2e}"
                      f" of scale {float(our_grads[k].abs().max()):.2e}")
        print(f"{name}: |out| max {float(ref_out.abs().max()):.3f}, "
              f"ours-ref {float((our_out - ref_out).abs().max()):.2e}")
        if name == "h128x4":
            ours.eval(), ref.eval()
            null = torch.full_like(y, DIT_SHAPE["num_classes"])
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                both = ref.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]),
                                            DIT_CFG["cfg_scale"])
            out["dit/cfg_out"] = both[: len(x)].clone()
            out["dit/sample"] = _gen_dit_sample(ref, out)


def _gen_dit_sample(ref, out: dict) -> torch.Tensor:
    transport_pkg, _, _ = _TRANSPORT
    noise = uniform((2, DIT_SHAPE["in_channels"], 8, 8), 2, 1.7)
    y = torch.tensor([2, 7])
    out["dit/sample_noise"], out["dit/sample_y"] = noise, y
    sampler = transport_pkg.Sampler(transport_pkg.create_transport("Linear", "velocity"))
    fn = sampler.sample_ode(sampling_method="euler", num_steps=DIT_CFG["ref_num_steps"], atol=1e-6, rtol=1e-3,
                            timestep_shift=DIT_CFG["timestep_shift"])
    kw = dict(y=torch.cat([y, torch.full_like(y, DIT_SHAPE["num_classes"])]), cfg_scale=DIT_CFG["cfg_scale"],
              cfg_interval=True, cfg_interval_start=DIT_CFG["cfg_interval_start"])
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        return fn(torch.cat([noise, noise]), ref.forward_with_cfg, **kw)[-1][: len(noise)].clone()


class _StoredNormals:
    """Stands in for scipy.stats.norm in the reference's transport module: rvs returns the stored normals."""

    def __init__(self, z):
        self.z, self.calls = z, 0

    def rvs(self, loc, scale, size):
        assert size == len(self.z)
        self.calls += 1
        return loc + scale * self.z.double().numpy()


def _gen_flow(out: dict) -> None:
    transport_pkg, transport_mod, _ = _TRANSPORT
    g = torch.Generator().manual_seed(FLOW_SEED)  # FlowMatching.loss's draw order: the normals of t, then x0
    z = torch.randn(FLOW_SHAPE[0], generator=g)
    x0 = torch.randn(FLOW_SHAPE, generator=g)
    x1 = uniform(FLOW_SHAPE, 3, 1.5)
    pred = uniform(FLOW_SHAPE, 4, 2.0)
    y = torch.tensor([1, 0, 3, 2])
    tr = transport_pkg.create_transport("Linear", "velocity", None, None, None, use_cosine_loss=True,
                                        use_lognorm=True)
    seen = {}

    def model(xt, t, y):
        seen.update(xt=xt.clone(), t=t.clone(), y=y.clone())
        return pred.clone()

    normals, saved_norm, saved_randn_like = _StoredNormals(z), transport_mod.norm, torch.randn_like
    calls = []
    torch.randn_like = lambda like, *a, **k: calls.append(like.shape) or x0.clone()  # the reference's x0 draw
    transport_mod.norm = normals
    try:
        terms = tr.training_losses(model, x1, dict(y=y))
    finally:
        torch.randn_like, transport_mod.norm = saved_randn_like, saved_norm
    assert normals.calls == 1 and calls == [x1.shape] and torch.equal(seen["y"], y)
    _, _, ut = tr.path_sampler.plan(seen["t"], x0, x1)
    total = terms["cos_loss"].mean() + terms["loss"].mean()  # train.py: loss_dict["cos_loss"].mean() + mse_loss
    z64 = torch.randn(64, generator=torch.Generator().manual_seed(FLOW_SEED + 1)) * 1.5
    out.update({"flow/z": z, "flow/x0": x0, "flow/x1": x1, "flow/pred": pred, "flow/y": y, "flow/t": seen["t"],
                "flow/xt": seen["xt"], "flow/ut": ut, "flow/mse": terms["loss"], "flow/cos": terms["cos_loss"],
                "flow/total": total.reshape(1), "flow/z64": z64,
                "flow/t64": _logit_normal(tr, z64)})


def _logit_normal(tr, z):
    _, transport_mod, _ = _TRANSPORT
    saved = transport_mod.norm
    transport_mod.norm = _StoredNormals(z)  # sample_logit_normal(0, 1) on the stored (already scaled) normals
    try:
        return tr.sample_logit_normal(0, 1, size=len(z))
    finally:
        transport_mod.norm = saved


def _gen_sampler(ref_mod, out: dict) -> None:
    transport_pkg, _, integrators = _TRANSPORT
    params = stub_params()
    noise = uniform((3, STUB_CHANNELS, 4, 4), 5, 1.7)
    y = torch.tensor([0, 3, 1])
    null = torch.full_like(y, STUB_CLASSES)
    out.update({"sampler/W": params["W"], "sampler/E": params["E"], "sampler/noise": noise, "sampler/y": y})
    forward_with_cfg = ref_mod.lightningdit.LightningDiT.forward_with_cfg  # the reference's, on the stub

    class Stub:
        def forward(self, x, t, y):
            return velocity_stub(params, x, t, y)
    stub = Stub()
    sampler = transport_pkg.Sampler(transport_pkg.create_transport("Linear", "velocity"))
    for name, (method, num_steps, cfg, start, shift) in SAMPLER_CASES.items():
        fn = sampler.sample_ode(sampling_method=method, num_steps=num_steps, atol=1e-6, rtol=1e-3, timestep_shift=shift)
        with torch.no_grad():
            if cfg <= 1.0:  # inference.py: model.forward without guidance
                out[f"sampler/{name}"] = fn(noise, stub.forward, y=y)[-1].clone()
                continue
            kw = dict(y=torch.cat([y, null]), cfg_scale=cfg, cfg_interval=True, cfg_interval_start=start)
            raw = fn(torch.cat([noise, noise]), lambda x, t, **k: forward_with_cfg(stub, x, t, **k), **kw)
            at_one = []

            def ours_convention(x, t, **k):  # t == 1 unguided, through the reference's own interval switch
                if float(t[0]) >= 1.0:
                    at_one.append(float(t[0]))
                    k = {**k, "cfg_interval_start": 2.0}
                return forward_with_cfg(stub, x, t, **k)
            conv = fn(torch.cat([noise, noise]), ours_convention, **kw)
        assert len(at_one) == (method == "heun2"), (name, at_one)
        out[f"sampler/{name}"] = conv[-1][: len(noise)].clone()
        if at_one:
            out[f"sampler/{name}_raw"] = raw[-1][: len(noise)].clone()
        else:
            assert torch.equal(raw[-1], conv[-1])
    for name, (n, shift) in TIME_GRIDS.items():
        out[f"sampler/grid_{name}"] = integrators.ode(drift=None, t0=0, t1=1, sampler_type="euler", num_steps=n,
                                                      atol=1e-6, rtol=1e-3, timestep_shift=shift).t.clone()


_TRANSPORT = None


def main() -> None:
    global _TRANSPORT
    import numpy
    import scipy
    import torchdiffeq
    from safetensors.torch import save_file

    from aligntok.bench import reference
    ref_mod = reference.load()
    root = ref_mod.root
    commit = _commit(root)
    _TRANSPORT = _import_transport(root)
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    _gen_dit(ref_mod, out)
    _gen_flow(out)
    _gen_sampler(ref_mod, out)
    shapes = {}
    for name, (hidden, heads, qk_norm, _, _) in DIT_CONFIGS.items():
        shapes[name] = {k: list(p.shape) for k, p in build_ours(hidden, heads, qk_norm).named_parameters()}
    meta = {"reference": "https://github.com/hustvl/LightningDiT", "reference_commit": commit,
            "made_by": "tests/golden/make_lightningdit_golden.py", "torch": torch.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__,
            "torchdiffeq": getattr(torchdiffeq, "__version__", "?"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": "1",
            "parameter_shapes": json.dumps(shapes, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in sorted(out.items())}, str(FIXTURE), metadata=meta)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size:,} bytes, {len(out)} tensors) from {root} @ {commit}")


if __name__ == "__main__":
    main()
