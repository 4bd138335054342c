"""`aligntok bench scale`: does memory per process stay flat as the data set grows 8x?

For N = 2,000 and 16,000 synthetic 256 px images, in a throw-away copy of this project (git + DVC, the real
stage commands): `dvc repro prepare` on every core (and `aligntok prepare` on one, for the rate), a few steps of
tokenizer stage 1 with 2 DataLoader workers, `cache-latents` over the whole split, and a few steps of train-dit.
Each stage's peak RSS is the largest sum of resident memory over its whole process tree (workers included;
shared pages count once per process, so the figure errs high). The ratio of the two N is the figure of merit
(goal <= 1.15). Also: prepare img/s against the single-core PIL decode+crop limit, the training loader's img/s,
and the disk that workspace + DVC cache use for data/ as a multiple of the data's size (goal <= 1.1).

Stage 3 is not trained here: the stage-1 export stands in for the final tokenizer, since only its memory
behaviour is measured. Latents are cached without the flipped copy to halve the encoding time.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

SIZES = (2_000, 16_000)
RESOLUTION = 256


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants, from /proc (0 once it has exited)."""
    import psutil
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measured(cmd: list[str], cwd: Path, env: dict, every_s: float = 0.05) -> dict:
    """Run `cmd`; its wall time and the peak RSS of its process tree, sampled every `every_s`."""
    peak, t0 = 0, time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(every_s)
    reader.join(10)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(out)[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak / 2**20, 1)}


def unique_bytes(*roots: Path) -> int:
    """Bytes on disk under `roots`, a hard-linked file counted once and symlinks not at all."""
    seen, total = set(), 0
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_symlink() or not path.is_file():
                continue
            st = path.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def workspace(project: Path, dest: Path, overrides: dict) -> Path:
    """A git repo holding this project's tracked files and a params.yaml of the smoke profile + `overrides`."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=project, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (project / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / rel, dest / rel)
    params = yaml.safe_load((project / "profiles" / "smoke.yaml").read_text())
    for key, value in overrides.items():
        node = params
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=bench@aligntok", "-c", "user.name=bench"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "bench"]):
        subprocess.run(git + args, cwd=dest, check=True, capture_output=True)
    return dest


def one_size(project: Path, base: Path, n: int, resolution: int, steps: int) -> dict:
    from aligntok.bench.prepare import _loader_rate
    overrides = {"data.resolution": resolution, "data.num_images": n, "data.val_fraction": 0.02,
                 "data.shard_rows": 512, "data.num_workers": 2, "latents.hflip": False, "latents.shard_rows": 512,
                 "tokenizer.stage1.steps": steps, "tokenizer.stage1.batch_size": 8,
                 "tokenizer.stage1.ckpt_every": steps, "tokenizer.stage1.disc_start": steps,
                 "tokenizer.eval_images": 8, "dit.steps": steps, "dit.ckpt_every": steps, "dit.image_every": steps,
                 "dit.log_every": 1}
    repo = workspace(project, base / f"n{n}", overrides)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIGNTOK_", "PREFECT_"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{base / f'n{n}.db'}", TQDM_DISABLE="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))  # dvc, aligntok
    cli = [sys.executable, "-m", "aligntok.cli"]
    row = {"images": n}
    row["prepare_dvc_all_cores"] = measured(["dvc", "repro", "prepare"], repo, env)
    row["prepare_1_core"] = measured([*cli, "prepare", "-S", "data.num_workers=1", "-S", "data.name=serial"], repo, env)
    data = repo / "data" / "synthetic"
    size = unique_bytes(data)
    row["data_mb"] = round(size / 2**20, 1)
    row["disk_workspace_plus_cache_x"] = round(unique_bytes(data, repo / ".dvc" / "cache") / size, 3)
    row["tokenizer_stage1"] = measured([*cli, "tokenizer-stage1"], repo, env)
    stage3 = repo / "outputs" / "tokenizer" / "stage3" / "model"
    shutil.copytree(repo / "outputs" / "tokenizer" / "stage1" / "model", stage3)
    row["cache_latents"] = measured([*cli, "cache-latents"], repo, env)
    row["train_dit"] = measured([*cli, "train-dit"], repo, env)
    row["loader_workers2_img_s"] = round(_loader_rate(data, 2), 1)
    for key in ("prepare_dvc_all_cores", "prepare_1_core"):
        row[key]["img_s"] = round(n / row[key]["seconds"], 1)
    return row


def run(quick: bool = False, project: Path | None = None, keep: Path | None = None) -> dict:
    from aligntok.bench.prepare import _pil_limit
    from aligntok.data.images import encode_png
    from aligntok.data.synthetic import synthetic_image

    sizes, resolution, steps = ((64, 512), 32, 2) if quick else (SIZES, RESOLUTION, 4)
    project = Path(project or Path.cwd())
    base = Path(keep or tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        rows = []
        for n in sizes:  # each size's row is printed when it is done: a long run cut short keeps what it measured
            rows.append(one_size(project, base, n, resolution, steps))
            print(f"bench scale: N={n}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        pngs = [encode_png(synthetic_image(i, i % 10, resolution, seed=0)) for i in range(64)]
        limit = _pil_limit(pngs, resolution)
    finally:
        if keep is None:
            shutil.rmtree(base, ignore_errors=True)
    small, large = rows
    ratios = {stage: round(large[stage]["peak_rss_mb"] / small[stage]["peak_rss_mb"], 3)
              for stage in ("prepare_dvc_all_cores", "tokenizer_stage1", "cache_latents", "train_dit")}
    return {"resolution": resolution, "cores": os.cpu_count(), "pil_decode_crop_1core_img_s": round(limit, 1),
            "sizes": rows, "peak_rss_ratio_large_over_small": ratios,
            "flat": all(r <= 1.15 for r in ratios.values()),
            "disk_ok": all(r["disk_workspace_plus_cache_x"] <= 1.1 for r in rows)}
