"""Issue 11's GPU options on a CPU: activation checkpointing and block compilation leave the DiT's loss and
gradients as they were, every CUDA-only switch is inert here, and `make gpu-check` stops in one line without
a GPU."""
import copy

import pytest
import torch

from aligntok.models.dit import build_dit
from aligntok.train.loop import adamw, bf16_autocast, cuda_fast_math


def _loss_and_grads(model, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x, t, y = torch.randn(4, 4, 4, 4, generator=g), torch.rand(4, generator=g), torch.randint(0, 3, (4,), generator=g)
    model.zero_grad(set_to_none=True)
    loss = (model(x, t, y) - x).pow(2).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _tiny(**kw):
    torch.manual_seed(0)
    model = build_dit("tiny", input_size=4, in_channels=4, num_classes=3, class_dropout_prob=0.0, **kw)
    # adaLN-Zero makes the initial output exactly zero and most gradients zero; perturb so every path carries signal
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _assert_same(a, b, atol: float) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=atol)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=0, atol=atol, msg=k)


@pytest.mark.numeric
def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = _tiny()
    plain = _loss_and_grads(model)
    model.grad_checkpointing = True
    # recomputation re-runs the same CPU kernels on the same inputs in the same order: measured bit-identical;
    # atol 1e-7 (fp32 rounding of O(1) values) only allows for a kernel picking another reduction order
    _assert_same(plain, _loss_and_grads(model), atol=1e-7)
    model.eval()  # eval / no-grad forwards never checkpoint (nothing to save memory for)
    with torch.no_grad():
        model(torch.zeros(1, 4, 4, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_compile_flag_keeps_parameter_names_and_a_deepcopy_independent():
    model = _tiny()
    keys = list(model.state_dict())
    model.compile_blocks()
    assert list(model.state_dict()) == keys  # checkpoints load with or without dit.compile
    shadow = copy.deepcopy(model)  # what the EMA does
    assert shadow.compiled and all(a is not b for a, b in zip(shadow.parameters(), model.parameters()))


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_gradients():
    model = _tiny(depth=1)
    eager = _loss_and_grads(model)
    model.compile_blocks()
    # inductor fuses elementwise ops and may reorder fp32 reductions: differences are a few fp32 ulps of O(1)
    # values (~1e-7); atol 1e-5 allows that and still fails on any wrong graph (errors of O(1e-2) or more)
    _assert_same(eager, _loss_and_grads(model), atol=1e-5)


def test_cuda_only_switches_are_inert_on_cpu():
    cpu = torch.device("cpu")
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    cuda_fast_math(cpu)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with bf16_autocast(cpu):
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
    opt = adamw([torch.nn.Parameter(torch.zeros(2))], cpu, lr=1e-3)
    assert not opt.defaults["fused"]  # the default (foreach/for-loop) implementation, as before


def test_gpu_check_stops_in_one_line_without_cuda(monkeypatch, capsys, tmp_path):
    from aligntok.bench import gpu_check

    args = gpu_check.parse_args(["--batches", "8", "16", "--skip-compile", "--out", str(tmp_path / "g.json")])
    assert args.batches == [8, 16] and args.skip_compile and args.steps == 5
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "g.json")]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "needs a CUDA GPU" in out[0]
    assert not (tmp_path / "g.json").exists()
