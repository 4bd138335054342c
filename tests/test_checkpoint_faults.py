"""Checkpoint faults: a torn or corrupt newest checkpoint, a kill before `latest` moves, a full disk.

The stage must fall back to the newest checkpoint that verifies and say so, never crash on every rerun, and a
failed write must leave the previous good checkpoint intact.
"""
import errno
import shutil

import pytest
import torch

from aligntok.train import checkpoint as ck
from aligntok.train.checkpoint import CheckpointWriteError, find_checkpoint
from tests.test_train_loop import ToyRecipe, run


def _two_checkpoints(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "b", stop_after=9)  # checkpoints at steps 4 and 8
    d = tmp_path / "b"
    assert sorted(p.name for p in d.glob("step-*")) == ["step-00000004", "step-00000008"]
    return d


def test_truncated_latest_falls_back_to_previous_and_says_so(tmp_path, capfd):
    d = _two_checkpoints(tmp_path)
    weights = d / "step-00000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # what a full disk or a crash mid-write leaves
    found = find_checkpoint(d, "h")
    assert found is not None and found.step == 4
    err = capfd.readouterr().err
    assert "step-00000008: model.safetensors does not match its recorded sha256" in err and "resuming from" in err
    # the rerun trains on from step 4 and ends exactly where an uninterrupted run ends
    full, _ = run(tmp_path, "a")
    resumed, out = run(tmp_path, "b")
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)  # same process, same shapes and threads: bit-identical by construction
    assert out["history"][-1]["step"] == 12


def test_kill_between_rename_and_latest_resumes_from_the_newest(tmp_path):
    d = _two_checkpoints(tmp_path)
    (d / "latest").write_text("step-00000004")  # the pointer update never happened
    assert find_checkpoint(d, "h").step == 8


@pytest.mark.parametrize("damage", ["meta", "missing", "empty_state"])
def test_other_damage_is_skipped(tmp_path, damage):
    d = _two_checkpoints(tmp_path)
    new = d / "step-00000008"
    if damage == "meta":
        (new / "meta.json").write_text("{not json")
    elif damage == "missing":
        (new / "state.pt").unlink()
    else:
        (new / "state.pt").write_bytes(b"")
    assert find_checkpoint(d, "h").step == 4


def test_all_corrupt_starts_fresh_loudly(tmp_path, capfd):
    d = _two_checkpoints(tmp_path)
    for p in d.glob("step-*"):
        (p / "model.safetensors").write_bytes(b"")
    assert find_checkpoint(d, "h") is None
    assert "no usable checkpoint" in capfd.readouterr().err


def test_partial_temp_folder_is_ignored(tmp_path):
    d = _two_checkpoints(tmp_path)
    shutil.copytree(d / "step-00000008", d / ".tmp-step-00000012")
    (d / ".tmp-step-00000012" / "meta.json").unlink()
    assert find_checkpoint(d, "h").step == 8


def test_disk_full_during_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    d = _two_checkpoints(tmp_path)
    real_save = torch.save

    def full_disk(obj, path, *a, **kw):
        if ".tmp-step-" in str(path):
            real_save(obj, path, *a, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    recipe = ToyRecipe()
    with pytest.raises(CheckpointWriteError) as err:
        ck.save_checkpoint(d, 12, modules={"net": recipe.model}, ema={}, optimizers={"main": recipe.opt},
                           schedulers={}, state_hash="h", run_id=None, history=[])
    msg = str(err.value)
    assert "\n" not in msg and "disk full" in msg and "step-00000008" in msg
    assert not list(d.glob(".tmp-step-*")) and not (d / "step-00000012").exists()
    assert find_checkpoint(d, "h").step == 8
