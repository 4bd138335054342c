"""Multi-node plumbing that works on one machine and breaks on a cluster, found before a run starts.

- MLflow's default store is sqlite: on NFS/Lustre/GPFS/CIFS its file locks are unreliable, and several nodes
  writing one database corrupt it or stall on "database is locked". An HTTP tracking server fixes it.
- DVC takes its repo lock (.dvc/tmp/rwlock, .dvc/tmp/lock) with plain files that Lustre and NFS do not lock
  atomically; `dvc config core.hardlink_lock true` makes DVC lock by hardlink, which they do.
- gloo binds to the address the hostname resolves to; many images map it to 127.0.1.1 in /etc/hosts, so the other
  nodes cannot reach it. GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME for NCCL) name the interface instead.

Every check takes its inputs (the /proc/mounts text, the environment, the resolved address) as arguments, so a test
feeds it a cluster's mount table; `aligntok preflight` passes this machine's.
"""
from __future__ import annotations

import configparser
from pathlib import Path

# /proc/mounts fstype values of shared network or parallel file systems
NETWORK_FS = frozenset({"nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "fuse.ceph",
                        "glusterfs", "fuse.glusterfs", "panfs", "wekafs"})
_TRUE = {"true", "1", "yes", "on"}


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mounts(text: str) -> list[tuple[str, str]]:
    """(mount point, fstype) of each line of /proc/mounts text: `device mountpoint fstype options dump pass`."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append((_unescape(fields[1]), fields[2]))
    return mounts


def fs_type(path: str | Path, mounts_text: str) -> str:
    """The fstype of the mount holding `path`: the longest mount point above it (a later mount over the same
    point hides an earlier one, as the kernel lists them in mount order)."""
    parts = Path(path).expanduser().absolute().parts
    best, best_len = "unknown", -1
    for point, kind in parse_mounts(mounts_text):
        point_parts = Path(point).parts
        if parts[:len(point_parts)] == point_parts and len(point_parts) >= best_len:
            best, best_len = kind, len(point_parts)
    return best


def read_mounts() -> str:
    try:
        return Path("/proc/mounts").read_text()
    except OSError:  # not Linux: no mount table, every path reads as 'unknown'
        return ""


def mlflow_store(uri: str, mounts_text: str) -> tuple[bool, str]:
    """(ok, one line) for a tracking URI: sqlite on a network file system fails."""
    if not uri.startswith("sqlite:"):
        return True, f"{uri.split('://')[0]} store ({'server' if uri.startswith('http') else 'no shared sqlite'})"
    path = uri.split(":///", 1)[1] if ":///" in uri else uri.split(":", 1)[1]
    kind = fs_type(path, mounts_text)
    if kind in NETWORK_FS:
        return False, (f"tracking store {uri} is sqlite on {kind}: its locks are unreliable there and several nodes "
                       f"corrupt it; run an HTTP tracking server (`mlflow server --backend-store-uri "
                       f"sqlite:///<local disk>/mlflow.db --host 0.0.0.0 --port 5000` on one node) and set "
                       f"tracking.uri=http://<that node>:5000 (or MLFLOW_TRACKING_URI)")
    return True, f"sqlite on {kind}: {path}"


def dvc_hardlink_lock(repo: Path) -> bool:
    """core.hardlink_lock from .dvc/config and .dvc/config.local (the local file wins, as in DVC)."""
    value = None
    for name in ("config", "config.local"):
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read_string((repo / ".dvc" / name).read_text())
        except (OSError, configparser.Error):
            continue
        if parser.has_option("core", "hardlink_lock"):
            value = parser.get("core", "hardlink_lock").strip().lower() in _TRUE
    return bool(value)


def dvc_lock(repo: Path | None, mounts_text: str) -> tuple[bool, str]:
    """(ok, one line): DVC's repo lock on Lustre/NFS (any network file system) needs core.hardlink_lock."""
    if repo is None:
        return True, "not in a DVC repository"
    kind = fs_type(repo / ".dvc", mounts_text)
    if dvc_hardlink_lock(repo):
        return True, f".dvc on {kind}, core.hardlink_lock true"
    if kind in NETWORK_FS:
        return False, (f"{repo / '.dvc'} is on {kind}, where DVC's plain lock files are not atomic; run "
                       f"`dvc config core.hardlink_lock true`")
    return True, f".dvc on {kind}: plain lock files are fine"


def dvc_repo(start: Path) -> Path | None:
    for folder in [start.absolute(), *start.absolute().parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def rendezvous_address(address: str, nnodes: int, env: dict[str, str]) -> tuple[bool, str]:
    """(ok, one line): with several nodes, a hostname resolving to loopback needs GLOO_SOCKET_IFNAME."""
    loopback = address.startswith("127.") or address == "::1"
    if nnodes <= 1:
        return True, f"one node: hostname resolves to {address}"
    if not loopback:
        return True, f"{nnodes} nodes: hostname resolves to {address}"
    if env.get("GLOO_SOCKET_IFNAME"):
        return True, (f"{nnodes} nodes: hostname resolves to {address}, GLOO_SOCKET_IFNAME="
                      f"{env['GLOO_SOCKET_IFNAME']}")
    return False, (f"{nnodes} nodes, but this hostname resolves to {address} (loopback): gloo would bind there and "
                   f"other nodes cannot connect; set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the interface "
                   f"the nodes share (see `ip -o -4 addr`, e.g. eth0 or ib0), or fix /etc/hosts")
