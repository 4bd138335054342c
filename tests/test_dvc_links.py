"""DVC at scale: big outs are linked between the workspace and the cache, never copied (`.dvc/config`)."""
import os
import sys

from aligntok.bench.scale import unique_bytes as _unique_bytes
from tests.test_pipeline import copy_repo, isolated_env, sh


def test_prepared_data_is_linked_not_copied(tmp_path):
    env = isolated_env(tmp_path)
    repo = copy_repo(tmp_path / "aligntok")
    sh([sys.executable, "-m", "aligntok.cli", "profile", "ci"], repo, env)
    sh(["dvc", "repro", "prepare"], repo, env)
    data = repo / "data" / "synthetic"
    shards = sorted(data.rglob("*.parquet"))
    assert shards
    for shard in shards:  # hard link (same file system) or symlink (cache elsewhere): either way no copy
        assert shard.is_symlink() or shard.stat().st_nlink >= 2, shard
    data_bytes = _unique_bytes(data)
    used = _unique_bytes(data, repo / ".dvc" / "cache")
    assert used <= 1.1 * data_bytes, (used, data_bytes)
    # a git worktree sharing the cache (what a Prefect run does) checks the data out as links too
    sh(["git", "add", "-f", "params.yaml", "dvc.lock"], repo, env)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "ci"], repo, env)
    wt = tmp_path / "wt"
    sh(["git", "worktree", "add", "--detach", str(wt), "HEAD"], repo, env)
    sh(["dvc", "cache", "dir", "--local", str(repo / ".dvc" / "cache")], wt, env)
    sh(["dvc", "checkout", "prepare"], wt, env)
    for shard in sorted((wt / "data" / "synthetic").rglob("*.parquet")):
        assert shard.is_symlink() or shard.stat().st_nlink >= 3, shard  # workspace + cache + worktree


def test_bench_measures_a_process_trees_peak_memory(tmp_path):
    """The scale benchmark's yardstick: a child that holds 200 MB must show up in its parent's tree figure."""
    from aligntok.bench.scale import measured
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time; b = bytearray(200 << 20); b[::4096] = b\"x\" * len(b[::4096]); time.sleep(1.5)'])")
    fig = measured([sys.executable, "-c", code], tmp_path, dict(os.environ))
    assert fig["peak_rss_mb"] >= 200, fig  # the child's touched pages, plus two interpreters
