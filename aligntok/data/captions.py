"""The captions of a prepared captioned split, streamed in index order (the order `ShardDataset` serves rows).

Only the `caption` column is read, one row group at a time: memory is one row group's captions, whatever the
data set's size.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from aligntok.data.shards import SPLITS, DataError, open_shard, read_manifest


def iter_captions(data_dir: Path, split: str) -> Iterator[str]:
    """Every caption of `split` in index order. The folder is checked now (a one-line DataError if it holds no
    captions); shards are read as the iterator is consumed."""
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise DataError(f"split: given {split!r}; expected 'train' or 'val'")
    manifest = read_manifest(data_dir)
    if not manifest.get("captioned"):
        raise DataError(f"{data_dir}: no captions (prepared from the {manifest.get('source', 'unknown')} source); "
                        f"expected a captioned data set: prepare scenes, webdataset or img2dataset with task text")
    return _captions(data_dir, manifest["shards"][split])


def _captions(data_dir: Path, shards: list[dict]) -> Iterator[str]:
    for shard in shards:
        path = data_dir / shard["file"]
        pf = open_shard(path)
        with pf:
            if "caption" not in pf.schema_arrow.names:
                raise DataError(f"{path}: shard lacks the caption column the manifest promises; re-run "
                                f"`aligntok prepare`")
            if pf.metadata.num_rows != shard["rows"]:
                raise DataError(f"{path}: {pf.metadata.num_rows} rows, manifest says {shard['rows']}; re-run "
                                f"`aligntok prepare`")
            for g in range(pf.metadata.num_row_groups):
                yield from pf.read_row_group(g, columns=["caption"]).column("caption").to_pylist()
