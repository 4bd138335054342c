"""Three user paths through the console script itself: `aligntok sample` (grid and ADM .npz), the `srun` re-launch
a distributed stage builds from SLURM_* variables, and `aligntok tracking sync` replaying a journal kept while the
tracking server was away.

`sample` runs on test_evaluate_dist's random-init models (its module fixture `workdir`, imported here: ci-profile
data, a tokenizer, a DiT whose weights are perturbed so labels change the samples), so a run costs seconds.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.conftest import ROOT
from tests.test_evaluate_dist import workdir  # noqa: F401 - a module fixture, shared rather than rebuilt

ALIGNTOK = str(Path(sys.executable).parent / "aligntok")
TORCHRUN_VARS = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT"}


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without torchrun/Slurm/MLflow/aligntok settings, plus only what a test sets."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MLFLOW_", "ALIGNTOK_", "TORCHELASTIC_", "PREFECT_", "DVC_"))
           and k not in TORCHRUN_VARS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def aligntok(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ALIGNTOK, *args], cwd=cwd, env=env or clean_env(ALIGNTOK_TRACKING="0"),
                          capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("aligntok:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------ aligntok sample
CLASSES, PER, RES, PAD = 10, 4, 32, 12  # ci profile: 10 classes at 32 px; the grid shows 4 per class, 12 px label


def _generator(workdir: Path):
    from aligntok.config import load_params
    from aligntok.generate import load_generator
    gen = load_generator(workdir / "outputs/dit/model", workdir / "outputs/tokenizer/stage3/model",
                         torch.device("cpu"))
    return gen, load_params(workdir / "params.yaml")


def _images(gen, params, labels: list[int], indices: list[int]) -> np.ndarray:
    from aligntok.generate import to_uint8_nhwc
    return to_uint8_nhwc(gen.images(torch.tensor(labels), indices, params.sample))


@pytest.mark.slow
def test_sample_grid_shows_each_class_in_its_column_and_is_seeded(workdir, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        ok(aligntok(workdir, "sample", "--out", str(tmp_path / f"{name}/grid.png"), "-S", f"sample.seed={seed}"))
    png = Image.open(tmp_path / "a/grid.png")
    assert png.format == "PNG" and png.mode == "RGB" and png.size == (CLASSES * RES, PER * (RES + PAD))
    grid = np.asarray(png)
    assert grid.dtype == np.uint8
    assert (tmp_path / "a/grid.png").read_bytes() == (tmp_path / "b/grid.png").read_bytes()  # same seed, same bytes
    other = np.asarray(Image.open(tmp_path / "c/grid.png"))
    assert np.abs(other.astype(int) - grid).mean() > 5  # another seed: other noise (mean |diff| measured ~25 levels)

    # Column c holds class c; row r its r-th sample, whose noise is that of sample index 4c + r (seed, index).
    cells = np.stack([grid[r * (RES + PAD) + PAD:(r + 1) * (RES + PAD), c * RES:(c + 1) * RES]
                      for r in range(PER) for c in range(CLASSES)]).astype(int)
    labels = [c for r in range(PER) for c in range(CLASSES)]
    indices = [PER * c + r for r in range(PER) for c in range(CLASSES)]
    gen, params = _generator(workdir)
    right = _images(gen, params, labels, indices)
    wrong = _images(gen, params, [(c + 1) % CLASSES for c in labels], indices)
    # Tolerance 1 uint8 level per pixel (another batch order and thread count; measured 0). Each wrong-label cell is
    # off by >= 7 levels somewhere (measured), so every cell's label is really checked.
    assert np.abs(cells - right).max() <= 1
    assert (np.abs(cells - wrong).reshape(len(cells), -1).max(axis=1) > 1).all()

    # The strip above each image names its class (the manifest's names, cut to 5 characters), in the default font.
    names = json.loads((workdir / "data/synthetic/manifest.json").read_text())["class_names"]
    assert len(set(name[:5] for name in names)) == CLASSES  # distinct strips: a swapped column would show
    for c, name in enumerate(names):
        strip = Image.new("RGB", (RES, PAD), "white")
        ImageDraw.Draw(strip).text((1, 0), name[:5], fill="black")
        for r in range(PER):
            got = grid[r * (RES + PAD):r * (RES + PAD) + PAD, c * RES:(c + 1) * RES]
            assert np.array_equal(got, np.asarray(strip)), (name, r)


@pytest.mark.slow
def test_sample_npz_has_the_requested_labels_and_is_seeded(workdir, tmp_path):
    from tests.test_evaluate_dist import clone
    n, cwd = 12, clone(workdir, tmp_path / "w")
    args = ["--npz", str(n), "-S", "eval.batch_size=4", "-S", "eval.labels=random"]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        shutil.rmtree(cwd / "checkpoints/evaluate", ignore_errors=True)  # no parts to reuse: every run samples
        proc = ok(aligntok(cwd, "sample", *args, "--npz-out", str(tmp_path / f"{name}.npz"), "-S",
                           f"sample.seed={seed}"))
        assert f"wrote {n} samples to {tmp_path / f'{name}.npz'} ({n} generated now, 0 reused)" in proc.stdout
        with np.load(tmp_path / f"{name}.npz") as f:
            runs[name] = (f["arr_0"], f["arr_1"])
    images, labels = runs["a"]
    assert images.shape == (n, RES, RES, 3) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype.kind == "i" and set(labels) <= set(range(CLASSES))
    assert not np.array_equal(labels, np.arange(n) % CLASSES)  # random, as requested, not the balanced default
    assert np.array_equal(runs["b"][0], images) and np.array_equal(runs["b"][1], labels)  # same seed: same samples
    assert np.abs(runs["c"][0].astype(int) - images).mean() > 5  # another seed: other samples
    gen, params = _generator(workdir)  # each image is sample i drawn with its stored label (tolerance 1 level)
    assert np.abs(_images(gen, params, labels.tolist(), list(range(n))).astype(int) - images).max() <= 1
    # a rerun with the same settings (seed 1, the last run's) reuses every part and writes the same samples
    proc = ok(aligntok(cwd, "sample", *args, "-S", "sample.seed=1", "--npz-out", str(tmp_path / "again.npz")))
    assert f"(0 generated now, {n} reused)" in proc.stdout
    with np.load(tmp_path / "again.npz") as f:
        assert np.array_equal(f["arr_0"], runs["c"][0]) and np.array_equal(f["arr_1"], runs["c"][1])
    # the default label mode, balanced: sample i is class i mod C
    ok(aligntok(cwd, "sample", "--npz", str(n), "-S", "eval.batch_size=4", "--npz-out", str(tmp_path / "bal.npz")))
    with np.load(tmp_path / "bal.npz") as f:
        assert np.array_equal(f["arr_1"], np.arange(n) % CLASSES)


@pytest.mark.slow
def test_sample_without_a_dit_export_is_one_line_and_exit_2(workdir, tmp_path):
    from tests.test_evaluate_dist import clone
    cwd = clone(workdir, tmp_path / "w")
    shutil.rmtree(cwd / "outputs/dit")
    one_line_error(aligntok(cwd, "sample", "--out", str(tmp_path / "grid.png")),
                   "outputs/dit/model/config.json", "not found", "aligntok train-dit")
    assert not (tmp_path / "grid.png").exists()


# ------------------------------------------------------------------------------------------- srun under Slurm
FAKE = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_LOG/$(basename "$0").argv"
if [ "$(basename "$0")" = scontrol ]; then [ -n "$FAKE_HOSTS" ] || exit 1; printf '%s\\n' $FAKE_HOSTS; fi
"""
STAGE = ["train-dit", "--params", str(ROOT / "profiles/ci.yaml"), "-S", "launcher.device=cpu"]


def launched(tmp_path: Path, nproc: int, hosts: str = "", **slurm: str):
    """`aligntok train-dit` with fake srun, torchrun and scontrol first on PATH (each records its argv; scontrol
    prints `hosts`, or fails when empty): the process, and the recorded argv of each fake that ran."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    for name in ("srun", "torchrun", "scontrol"):
        (fake / name).write_text(FAKE)
        (fake / name).chmod(0o755)
    env = clean_env(FAKE_LOG=str(tmp_path), FAKE_HOSTS=hosts, ALIGNTOK_TRACKING="0", **slurm)
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    proc = aligntok(tmp_path, *STAGE, "-S", f"launcher.nproc_per_node={nproc}", env=env)
    return proc, {p.name.removesuffix(".argv"): p.read_text().splitlines() for p in tmp_path.glob("*.argv")}


@pytest.mark.parametrize("case", ["scontrol", "no_scontrol"])
def test_a_multi_node_allocation_starts_one_torchrun_per_node_through_srun(tmp_path, case):
    if case == "scontrol":  # newer names; scontrol expands the node list; MASTER_PORT unset: 29500
        slurm = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "a[1-2]",
                 "SLURM_CPUS_PER_TASK": "16"}  # the job's CPUs go to each step (Slurm >= 22.05 would pin it to one)
        hosts, nodes, endpoint, job = "node-a1 node-a2", 2, "node-a1:29500", "77"
    else:  # older names, scontrol fails: the first host is read off the list itself; MASTER_PORT honoured
        slurm = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "3", "SLURM_NODELIST": "gpu[07-09]", "MASTER_PORT": "29611"}
        hosts, nodes, endpoint, job = "", 3, "gpu07:29611", "4242"
    proc, argv = launched(tmp_path, 4, hosts, **slurm)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the fake srun's exit status: aligntok exec'ed it
    assert argv["scontrol"] == ["show", "hostnames", slurm.get("SLURM_JOB_NODELIST") or slurm["SLURM_NODELIST"]]
    assert "torchrun" not in argv  # srun starts torchrun on each node; this process does not
    cpus = [f"--cpus-per-task={slurm['SLURM_CPUS_PER_TASK']}"] if "SLURM_CPUS_PER_TASK" in slurm else []
    assert argv["srun"] == [f"--nodes={nodes}", "--ntasks-per-node=1", *cpus, "--kill-on-bad-exit=1",
                            "--export=ALL,ALIGNTOK_SRUN_STEP=1", str(tmp_path / "fakebin/torchrun"),
                            "--nproc_per_node=4", f"--nnodes={nodes}", "--rdzv_backend=c10d",
                            f"--rdzv_endpoint={endpoint}", f"--rdzv_id={job}", "-m", "aligntok.cli", *STAGE,
                            "-S", "launcher.nproc_per_node=4"]


def test_a_one_node_allocation_runs_torchrun_standalone_without_srun(tmp_path):
    proc, argv = launched(tmp_path, 2, "gpu01", SLURM_JOB_ID="5", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="gpu01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(argv) == {"torchrun"}
    assert argv["torchrun"] == ["--nproc_per_node=2", "--standalone", "-m", "aligntok.cli", *STAGE,
                                "-S", "launcher.nproc_per_node=2"]


def test_slurm_nodes_without_a_node_list_is_one_line_and_exit_2(tmp_path):
    proc, argv = launched(tmp_path, 4, "", SLURM_JOB_ID="9", SLURM_JOB_NUM_NODES="2")
    one_line_error(proc, "SLURM_JOB_NODELIST is not set", "sbatch/salloc")
    assert argv == {}  # nothing started


# ------------------------------------------------------------------------------------ aligntok tracking sync
# Two stage runs, created while the server is up (as a stage creates its run and params); each logs step 1 and the
# background sender delivers it; then the server goes away and the later points stay in the local journals.
JOURNALLED = """
import json, sys, time
import mlflow
from aligntok.tracking.journal import MetricJournal, send_metrics
db, dead = sys.argv[1:]
mlflow.set_tracking_uri(db)
client = mlflow.MlflowClient()
experiment = client.create_experiment("aligntok")
journals = []
for stage in ("train-dit", "evaluate"):
    run_id = client.create_run(experiment, run_name=stage).info.run_id
    client.log_param(run_id, "stage", stage)
    journals.append(MetricJournal(run_id, send_metrics, interval_s=0.05, max_backoff_s=0.2))
for j in journals:
    j.append({"loss": 1.5, "lr": 1e-4}, step=1)
deadline = time.monotonic() + 120
while any(j.pending() for j in journals) and time.monotonic() < deadline:
    time.sleep(0.05)
mlflow.set_tracking_uri(dead)
for step in range(2, 6):
    for k, j in enumerate(journals):
        j.append({"loss": 1 / step + k, "lr": 0.1 + 0.2}, step=step)
journals[1].append({"final": -3.25}, step=None)
print(json.dumps([[j.run_id, j.close(timeout_s=30)] for j in journals]))
"""


def expected_points(k: int) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every point run k logged, in step order."""
    points = {"loss": [(1, 1.5)] + [(s, 1 / s + k) for s in range(2, 6)],
              "lr": [(1, 1e-4)] + [(s, 0.1 + 0.2) for s in range(2, 6)]}
    return {**points, "final": [(0, -3.25)]} if k == 1 else points


def history(client, run_id: str) -> dict[str, list[tuple[int, float, int]]]:
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))
            for key in keys}


def test_tracking_sync_replays_the_outage_journal_exactly_once(tmp_path):
    import socket

    import mlflow
    with socket.socket() as s:  # a port nobody listens on: the server that went away
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = clean_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    proc = subprocess.run([sys.executable, "-c", JOURNALLED, db, dead], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.splitlines()[-1])
    assert [left for _, left in runs] == [8, 9]  # points kept locally during the outage
    journal = tmp_path / "checkpoints/tracking"
    client = mlflow.MlflowClient(tracking_uri=db)
    for run_id, _ in runs:
        assert (journal / f"{run_id}.sent").read_text() == "2"  # step 1's two points were accepted before
        assert {key: [p[:2] for p in pts] for key, pts in history(client, run_id).items()} == \
            {"loss": [(1, 1.5)], "lr": [(1, 1e-4)]}

    sync = ["tracking", "sync", "--params", str(ROOT / "profiles/ci.yaml")]
    # While the server is still away: one line, exit 1, and nothing marked sent.
    down = aligntok(tmp_path, *sync, env=clean_env(MLFLOW_TRACKING_URI=dead))
    first = min(run_id for run_id, _ in runs)  # journals are sent in file-name order
    print(one_line_error(down, f"MLflow at {dead} did not take the points of {first}",
                         "run it again when the server", code=1))
    assert [(journal / f"{run_id}.sent").read_text() for run_id, _ in runs] == ["2", "2"]
    # A second sync sends nothing. The counts printed and the .sent files are what shows a point is sent once: the
    # sqlite store silently drops a resent point identical to a stored one, so the histories alone could not.
    for attempt in range(2):
        out = ok(aligntok(tmp_path, *sync, env=clean_env(MLFLOW_TRACKING_URI=db))).stdout
        for k, (run_id, left) in enumerate(runs):
            assert f"{run_id}: {0 if attempt else left} metric points sent" in out, out
            lines = (journal / f"{run_id}.jsonl").read_text().splitlines()
            assert (journal / f"{run_id}.sent").read_text() == str(len(lines)) == str(2 + left)
            stamps = {(p["key"], p["step"]): p["timestamp"] for p in map(json.loads, lines)}
            # Values compared exactly (tolerance 0): JSON and MLflow's sqlite store both keep IEEE doubles.
            want = {key: [(s, v, stamps[key, s]) for s, v in pts] for key, pts in expected_points(k).items()}
            assert history(client, run_id) == want
    assert len(client.search_runs([client.get_experiment_by_name("aligntok").experiment_id])) == 2
    assert [client.get_run(r).data.params for r, _ in runs] == [{"stage": "train-dit"}, {"stage": "evaluate"}]
