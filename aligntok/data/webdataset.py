"""Captioned item sources in img2dataset's two output formats: WebDataset tar shards and parquet shards.

Planning reads no image bytes. A tar is walked header by header (`tarfile`, which seeks over member data): each
sample becomes an item holding the byte offsets and sizes of its image and caption members, and the unit that
builds the sample's shard reads just those bytes (`TarMembers`: one open file, a seek and a read per member). An
img2dataset parquet file is read one row group at a time, small columns only (key, status, error_message); an
item holds (file, row group, offset) and its unit reads the image and caption columns of one row group at a time.

Every problem is one item skipped with its reason in the manifest, never a stop: a key with an image but no
caption (or the reverse), a member the tar ends inside, a tar that is not a tar or ends early (the members
before the damage are kept), a row whose download did not succeed or has no image bytes. Undecodable image bytes
are skipped later, by the unit, as for every source (`aligntok.data.images`).

Item keys are `<shard path relative to data.root>/<sample key>`, unique across shards; labels are 0, class name
"image" (captioned data has no classes). Captions are stripped of surrounding whitespace in both formats.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow.parquet as pq

from aligntok.data.images import Skip
from aligntok.data.shards import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")        # a tar sample's image member, first found
IMAGE_COLUMNS = ("jpg", "png", "webp", "image")     # an img2dataset parquet's image-bytes column, first found
CLASS_NAMES = ["image"]
_BLOCK = 512


def shard_files(root: Path, suffix: str) -> list[Path]:
    """`root` itself if it is such a file, else every `*suffix` under it (sorted; hidden folders left out)."""
    root = Path(root)
    if root.is_file():
        return [root] if root.name.endswith(suffix) else []
    return sorted(p for p in root.rglob(f"*{suffix}")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _rel(path: Path, root: Path) -> str:
    return path.name if Path(root).is_file() else path.relative_to(root).as_posix()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _skip(key: str, reason: str) -> tuple:
    return key, 0, ("skip", reason)


# -- WebDataset tar shards -------------------------------------------------------------------------------------
def _walk_tar(path: Path) -> tuple[dict, str | None]:
    """{sample key: {ext: (data offset, size, member name)}} in first-seen order, and why the walk ended early."""
    samples: dict[str, dict] = {}
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            while (m := tar.next()) is not None:
                tar.members.clear()  # headers are not kept: memory is one entry per sample, not per member
                if not m.isfile():
                    continue
                folder, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                samples.setdefault(key, {})[ext.lower() if dot else ""] = (m.offset_data, m.size, m.name)
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as e:
        if not samples:
            return samples, f"not a readable tar ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})"
        return samples, f"truncated or damaged tar ({str(e).splitlines()[0][:80]}); the members before it are kept"
    with open(path, "rb") as f:  # tarfile stops quietly at a bad or missing header: check the end marker is there
        f.seek(end)
        marker = f.read(_BLOCK)
    if not marker:
        return samples, f"truncated tar (ends at byte {size} without its end-of-archive marker); the members " \
                        f"before it are kept"
    if marker.count(0) != len(marker):
        return samples, f"damaged tar (no valid header at byte {end}); the members before it are kept"
    return samples, None


def _tar_item(key: str, members: dict, path: Path, size: int, stamp: list[int]) -> tuple:
    for ext, (offset, length, name) in members.items():
        if offset + length > size:
            return _skip(key, f"truncated (the tar ends inside {name})")
    image = next((ext for ext in IMAGE_EXTS if ext in members), None)
    if image is None:
        found = ", ".join(f".{e}" if e else "a name without extension" for e in members)
        return _skip(key, f"no image member (.jpg, .jpeg, .png or .webp; found {found})")
    if "txt" not in members:
        return _skip(key, f"no caption (.txt member) for {members[image][2]}")
    (io, il, _), (co, cl, _) = members[image], members["txt"]
    return key, 0, ("tar", str(path), io, il, co, cl, stamp)


def webdataset_items(root: Path) -> tuple[list[str], list]:
    """(class names, items) of every `*.tar` under `root`; a sample's spec is ("tar", path, image offset, image
    size, caption offset, caption size, stamp)."""
    tars = shard_files(root, ".tar")
    if not tars:
        raise DataError(f"{root}: no *.tar shards found; expected WebDataset shards (key.jpg + key.txt members)")
    items = []
    for path in tars:
        rel, size, stamp = _rel(path, root), path.stat().st_size, _stamp(path)
        samples, damage = _walk_tar(path)
        items += [_tar_item(f"{rel}/{key}", members, path, size, stamp) for key, members in samples.items()]
        truncated_member = any(o + n > size for members in samples.values() for o, n, _ in members.values())
        if damage and not truncated_member:  # a member the tar ends inside already says what was lost
            items.append(_skip(rel, damage))
    return CLASS_NAMES, items


class TarMembers:
    """Reads members by offset, keeping the one tar a unit is reading open (a unit's items are in file order)."""

    def __init__(self):
        self.path, self.file = None, None

    def read(self, path: str, offset: int, size: int) -> bytes:
        if self.path != path:
            self.close()
            try:
                self.file = open(path, "rb")  # noqa: SIM115 - kept open across items, closed by close()
            except OSError as e:
                raise DataError(f"{path}: unreadable tar shard ({e.strerror or type(e).__name__})") from None
            self.path = path
        self.file.seek(offset)
        data = self.file.read(size)
        if len(data) != size:
            raise Skip(f"truncated (the tar ends {size - len(data)} bytes into a member)")
        return data

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.path, self.file = None, None


def caption_text(data: bytes | str | None) -> str:
    """A caption as stored: bytes must be UTF-8; surrounding whitespace is stripped; a missing one is a Skip."""
    if data is None:
        raise Skip("no caption (null)")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("caption is not UTF-8 text") from None
    return data.strip()


# -- img2dataset parquet shards -----------------------------------------------------------------------------------
def img2dataset_items(root: Path, caption_column: str = "caption") -> tuple[list[str], list]:
    """(class names, items) of every `*.parquet` under `root` written by img2dataset (output_format parquet); a
    row's spec is ("img2dataset", path, row group, offset, image column, caption column, stamp)."""
    files = shard_files(root, ".parquet")
    if not files:
        raise DataError(f"{root}: no *.parquet files found; expected img2dataset's parquet output")
    items = []
    for path in files:
        rel, stamp = _rel(path, root), _stamp(path)
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - unreadable: one line naming the file
            raise DataError(f"{path}: unreadable parquet file ({str(e).splitlines()[0][:120]}); expected "
                            f"img2dataset's parquet output") from None
        with pf:
            names = pf.schema_arrow.names
            image = next((c for c in IMAGE_COLUMNS if c in names), None)
            if image is None:
                raise DataError(f"{path}: no image-bytes column ({', '.join(IMAGE_COLUMNS)}); expected img2dataset's "
                                f"output_format parquet (its webdataset output's parquet files hold metadata only)")
            if caption_column not in names:
                raise DataError(f"{path}: no column {caption_column!r} (data.caption_column); expected one of "
                                f"{', '.join(n for n in names if n != image)[:200]}")
            small = [c for c in ("key", "status", "error_message") if c in names]
            row = 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                cols = pf.read_row_group(g, columns=small).to_pydict() if small else {}
                keys, statuses, errors = (cols.get(c, [None] * n) for c in ("key", "status", "error_message"))
                for off in range(n):
                    key = f"{rel}/{keys[off] if keys[off] is not None else row + off}"
                    if "status" in cols and statuses[off] != "success":
                        why = f" ({str(errors[off]).splitlines()[0][:80]})" if errors[off] else ""
                        items.append(_skip(key, f"status {statuses[off]!r}{why}"))
                    else:
                        items.append((key, 0, ("img2dataset", str(path), g, off, image, caption_column, stamp)))
                row += n
    return CLASS_NAMES, items
