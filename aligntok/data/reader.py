"""Random access to the rows of parquet shards with memory bounded by a few row groups, whatever the data size.

The reader maps a global row index to (shard, row group, offset) from parquet footers alone (no image bytes;
O(number of row groups) memory). A row is served from a small LRU cache of row groups (`cache` of them per
process, 4 by default) and files (`max_open`); every open, read (and its bytes) and hit is counted in `counters`,
so tests and benchmarks can check the bound instead of trusting it. Each process (DDP rank, DataLoader worker) has
its own cache: file handles and cached row groups are dropped when the reader is pickled or used after a fork.

Shards from before row groups were bounded (one row group per shard) are still read when each row group is
under `MAX_ROW_GROUP_BYTES`; larger ones are refused with a one-line DataError (re-run `aligntok prepare`).
"""
from __future__ import annotations

import os
import resource
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa

from aligntok.data.shards import DataError, open_shard

MAX_ROW_GROUP_BYTES = 256 << 20  # x cache (4) = the most row-group bytes one process holds: ~1 GiB worst case
COLUMNS = ("key", "image", "label")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RowGroupReader:
    """Rows of `shards` ([(path, expected rows)], in order) by global index; see the module docstring."""

    def __init__(self, shards: list[tuple[Path, int]], cache: int = 4, max_open: int = 8,
                 columns: tuple[str, ...] = COLUMNS):
        if cache < 1 or max_open < 1:
            raise ValueError(f"cache and max_open must be >= 1 (given {cache}, {max_open})")
        self.paths = [Path(p) for p, _ in shards]
        self.cache_size, self.max_open, self.columns = cache, max_open, tuple(columns)
        sizes, files, groups = [], [], []
        for f, (path, expected) in enumerate(shards):
            pf = open_shard(path)
            md = pf.metadata
            pf.close()
            if md.num_rows != expected:
                raise DataError(f"{path}: {md.num_rows} rows, manifest says {expected}; re-run `aligntok prepare`")
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                if rg.total_byte_size > MAX_ROW_GROUP_BYTES:
                    raise DataError(
                        f"{path}: row group {g} holds {rg.num_rows} rows in {rg.total_byte_size / 2**20:.1f} MiB, "
                        f"over the reader's {MAX_ROW_GROUP_BYTES / 2**20:.1f} MiB bound (a shard from before row "
                        f"groups were bounded); re-run `aligntok prepare`")
                sizes.append(rg.num_rows)
                files.append(f)
                groups.append(g)
        self.row_group_sizes = np.asarray(sizes, dtype=np.int64)
        self._file = np.asarray(files, dtype=np.int32)
        self._group = np.asarray(groups, dtype=np.int32)
        self._start = np.concatenate([[0], np.cumsum(self.row_group_sizes)]).astype(np.int64)
        self.num_rows = int(self._start[-1])
        self.counters = {"opens": 0, "reads": 0, "bytes_read": 0, "hits": 0, "peak_cached": 0, "peak_open": 0,
                         "peak_cached_bytes": 0}
        self._reset()

    # -- per-process state -------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._pid = os.getpid()
        self._files: OrderedDict[int, object] = OrderedDict()
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"], state["_cache"] = OrderedDict(), OrderedDict()  # handles and row groups stay behind
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _check_process(self) -> None:
        if os.getpid() != self._pid:  # forked (DataLoader worker): the parent's handles are not ours
            self._reset()

    # -- reading -----------------------------------------------------------------------------------------------
    @property
    def num_row_groups(self) -> int:
        return len(self.row_group_sizes)

    def group_start(self, g: int) -> int:
        return int(self._start[g])

    def locate(self, i: int) -> tuple[int, int]:
        """Global row index -> (row group, offset within it)."""
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range [0, {self.num_rows})")
        g = int(np.searchsorted(self._start, i, side="right")) - 1
        return g, i - int(self._start[g])

    def _open(self, f: int):
        if f in self._files:
            self._files.move_to_end(f)
            return self._files[f]
        while len(self._files) >= self.max_open:
            self._files.popitem(last=False)[1].close()
        pf = open_shard(self.paths[f])
        self._files[f] = pf
        self.counters["opens"] += 1
        self.counters["peak_open"] = max(self.counters["peak_open"], len(self._files))
        return pf

    def group(self, g: int, columns: tuple[str, ...] | None = None) -> pa.Table:
        """Row group `g` as a table, through the LRU cache (`columns`: an uncached read of just those)."""
        self._check_process()
        if columns is not None:
            return self._read(g, columns)
        if g in self._cache:
            self._cache.move_to_end(g)
            self.counters["hits"] += 1
            return self._cache[g]
        while len(self._cache) >= self.cache_size:
            self._cache.popitem(last=False)
        table = self._read(g, self.columns)
        self._cache[g] = table
        c = self.counters
        c["peak_cached"] = max(c["peak_cached"], len(self._cache))
        c["peak_cached_bytes"] = max(c["peak_cached_bytes"], sum(t.nbytes for t in self._cache.values()))
        return table

    def _read(self, g: int, columns: tuple[str, ...]) -> pa.Table:
        path = self.paths[self._file[g]]
        try:
            table = self._open(int(self._file[g])).read_row_group(int(self._group[g]), columns=list(columns))
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: unreadable row group {self._group[g]} "
                            f"({str(e).splitlines()[0][:120]}); re-run `aligntok prepare`") from None
        self.counters["reads"] += 1
        self.counters["bytes_read"] += table.nbytes
        return table

    def rows(self, indices) -> list[dict]:
        """Rows at `indices` (in that order), reading each row group they touch once, in file order."""
        by_group: dict[int, list[tuple[int, int]]] = {}
        for k, i in enumerate(indices):
            g, off = self.locate(int(i))
            by_group.setdefault(g, []).append((k, off))
        out: list = [None] * len(indices)
        for g in sorted(by_group):
            table = self.group(g)
            for k, off in by_group[g]:
                out[k] = {c: table.column(c)[off].as_py() for c in self.columns}
        return out

    def row(self, i: int) -> dict:
        return self.rows([i])[0]

    def column(self, name: str) -> list:
        """One column of every row (e.g. labels, keys): reads only that column, O(rows) memory; bypasses the cache."""
        out: list = []
        for g in range(self.num_row_groups):
            out += self.group(g, columns=(name,)).column(name).to_pylist()
        return out
