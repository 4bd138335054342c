"""Resume checkpoints: `checkpoints/<stage>/step-XXXXXXXX/` written atomically, `latest` points at the newest.

Weights go to safetensors; optimiser/scheduler/RNG state to a torch file that only holds tensors and plain
Python values, so it loads with `weights_only=True`. A checkpoint resumes only when its stored `state_hash`
(stage params + input hashes) matches; otherwise the stage starts fresh (a changed param must not silently
continue the old run).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aligntok.io import write_bytes_atomic

KEEP = 2


@dataclass
class Checkpoint:
    path: Path
    step: int
    state_hash: str
    run_id: str | None
    history: list[dict] = field(default_factory=list)


def flat_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            out[f"{name}.{k}"] = v.detach().to("cpu").contiguous()
    return out


def load_flat_state(modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor], source: Path) -> None:
    for name, mod in modules.items():
        prefix = f"{name}."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = mod.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{source}: checkpoint does not match module {name!r} "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def save_checkpoint(ckpt_dir: Path, step: int, *, modules: dict[str, torch.nn.Module],
                    ema: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    schedulers: dict[str, Any], state_hash: str, run_id: str | None, history: list[dict]) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(flat_state(modules), str(tmp / "model.safetensors"))
    if ema:
        save_file(flat_state(ema), str(tmp / "ema.safetensors"))
    state = {
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "state_hash": state_hash, "run_id": run_id,
                                               "history": history}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    write_bytes_atomic(ckpt_dir / "latest", final.name.encode())
    for old in sorted(ckpt_dir.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(ckpt_dir: Path, state_hash: str) -> Checkpoint | None:
    """The latest checkpoint written for this exact configuration, or None."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("state_hash") != state_hash:
        return None
    return Checkpoint(path, int(meta["step"]), meta["state_hash"], meta.get("run_id"), meta.get("history", []))


def load_checkpoint(ckpt: Checkpoint, *, modules, ema, optimizers, schedulers) -> None:
    load_flat_state(modules, load_file(str(ckpt.path / "model.safetensors")), ckpt.path)
    if ema:
        load_flat_state(ema, load_file(str(ckpt.path / "ema.safetensors")), ckpt.path)
    state = torch.load(ckpt.path / "state.pt", map_location="cpu", weights_only=True)
    for k, o in optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(state["schedulers"][k])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
