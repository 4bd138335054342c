"""Resume checkpoints: `checkpoints/<stage>/step-XXXXXXXX/` written atomically, `latest` points at the newest.

Weights go to safetensors; optimiser/scheduler/RNG state to a torch file that only holds tensors and plain
Python values, so it loads with `weights_only=True`. A checkpoint resumes only when its stored `state_hash`
(stage params + input hashes) matches; otherwise the stage starts fresh (a changed param must not silently
continue the old run).

Each checkpoint's meta.json records the sha256 of every file beside it, and `meta.json` is written last, so a
torn write (full disk, crash mid-write, a kill between the rename and `latest`) is detected on resume: the stage
then falls back to the newest checkpoint that verifies, says so on stderr, and never dies on every rerun.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from aligntok.io import save_safetensors, write_bytes_atomic
from aligntok.train.dist import from_main

KEEP = 2
FILES = ("model.safetensors", "ema.safetensors", "state.pt")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only, ...); the previous good checkpoint is intact."""


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
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_safetensors(flat_state(modules), tmp / "model.safetensors")  # a full disk raises OSError(ENOSPC)
        if ema:
            save_safetensors(flat_state(ema), tmp / "ema.safetensors")
        # no RNG state: the loop seeds every step from (seed, rank, step), so a resume on any world size draws
        # what an uninterrupted run would without it (a saved state would be one rank's only)
        state = {"optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                 "schedulers": {k: s.state_dict() for k, s in schedulers.items()}}
        torch.save(state, tmp / "state.pt")
        digests = {f: _sha256(tmp / f) for f in FILES if (tmp / f).exists()}
        write_bytes_atomic(tmp / "meta.json", json.dumps({"step": step, "state_hash": state_hash, "run_id": run_id,
                                                          "files": digests, "history": history}).encode())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        write_bytes_atomic(ckpt_dir / "latest", final.name.encode())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
        good = sorted(p.name for p in ckpt_dir.glob("step-*") if p != final)
        raise CheckpointWriteError(e.errno, f"{ckpt_dir}: could not write the step-{step} checkpoint ({reason}); "
                                            f"the previous checkpoint is intact: {good[-1] if good else 'none'}") from None
    for old in sorted(ckpt_dir.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, state_hash: str) -> tuple[Checkpoint | None, str | None]:
    """(checkpoint, None) when `path` is complete and made for `state_hash`; else (None, why not)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return None, "no meta.json (written partly)"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"unreadable meta.json ({type(e).__name__})"
    if meta.get("state_hash") != state_hash:
        return None, None  # another configuration's checkpoint: not an error, just not ours
    files = meta.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        return None, "meta.json lists no file digests"
    for name, digest in files.items():
        try:
            if _sha256(path / name) != digest:
                return None, f"{name} does not match its recorded sha256 (torn or corrupt)"
        except OSError:
            return None, f"{name} is missing"
    return Checkpoint(path, int(meta["step"]), meta["state_hash"], meta.get("run_id"), meta.get("history", [])), None


def find_checkpoint(ckpt_dir: Path, state_hash: str) -> Checkpoint | None:
    """The newest complete checkpoint written for this exact configuration, or None.

    Candidates are every `step-*` folder, newest first (so a kill between renaming a checkpoint into place and
    updating `latest` loses nothing); one that fails verification is reported and skipped, never loaded.
    Under torchrun only rank 0 looks and verifies, and every rank resumes its choice: ranks on other nodes may see
    a stale listing of the shared folder, and each rank hashing the same large files would only add reads.
    """
    return from_main(lambda: _newest_verified(Path(ckpt_dir), state_hash))


def _newest_verified(ckpt_dir: Path, state_hash: str) -> Checkpoint | None:
    skipped = []
    for path in sorted(ckpt_dir.glob("step-*"), reverse=True):
        found, why = _verify(path, state_hash)
        if found is not None:
            if skipped:
                print(f"aligntok: resuming from {path} (skipped {'; '.join(skipped)})", file=sys.stderr, flush=True)
            return found
        if why:
            skipped.append(f"{path.name}: {why}")
    if skipped:
        print(f"aligntok: no usable checkpoint in {ckpt_dir} ({'; '.join(skipped)}); starting from step 0",
              file=sys.stderr, flush=True)
    return None


def load_checkpoint(ckpt: Checkpoint, *, modules, ema, optimizers, schedulers) -> None:
    load_flat_state(modules, load_file(str(ckpt.path / "model.safetensors")), ckpt.path)
    if ema:
        load_flat_state(ema, load_file(str(ckpt.path / "ema.safetensors")), ckpt.path)
    state = torch.load(ckpt.path / "state.pt", map_location="cpu", weights_only=True)
    for k, o in optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(state["schedulers"][k])
