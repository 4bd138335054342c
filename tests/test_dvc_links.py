"""DVC at scale: big outs are linked between the workspace and the cache, never copied (`.dvc/config`)."""
import os
import sys
from pathlib import Path

from tests.test_pipeline import copy_repo, sh


def _unique_bytes(*roots: Path) -> int:
    """Disk bytes of the files under `roots`, a hard-linked file counted once and symlinks not at all."""
    seen, total = set(), 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_symlink() or not path.is_file():
                continue
            st = path.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def test_prepared_data_is_linked_not_copied(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ALIGNTOK_"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
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
