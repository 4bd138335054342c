"""Text cache: the train split's caption states from the frozen text encoder, in memory-mapped safetensors shards.

Row i is the caption of train image i, the indexing of the latent cache, so the DiT's data set joins the two by
image index (`aligntok.data.captioned_latents`). One row per image, not one per distinct caption: a table mapping
images to distinct captions would be one more structure that grows with the data set in every process's memory,
and repeated captions are rare in web data.

Shard k (`text-0000k.safetensors`) holds rows [k * shard_rows, (k + 1) * shard_rows):
  hidden   float16 [n, max_tokens, dim]  last hidden states, padding positions zero
  lengths  int32   [n]                   tokens of each caption: mask = arange(max_tokens) < length
  indices  int64   [n]                   the train image indices
  caption_digest uint8 [32]              sha256 of the shard's caption strings
and metadata `encoder_hash` (`TextEncoder.hash`: encoder class, weights, tokenizer, max_tokens), so a resume reuses a
shard only for the same encoder, the same images and the same captions. (One metadata key: safetensors writes
several in a random order per process, and the same cache would not be the same bytes.) manifest.json lists the
shards; `TextCache` maps them lazily, one row slice per item.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from aligntok.data.latents import LatentCacheError, memmap_safetensors
from aligntok.io import read_json, write_safetensors_atomic
from aligntok.progress import progress

MANIFEST = "manifest.json"
RERUN = "re-run `aligntok cache-text`"


class TextCacheError(ValueError):
    """A text cache problem, in one line naming the file and what was expected."""


def shard_name(k: int) -> str:
    return f"text-{k:05d}.safetensors"


def shard_rows_of(k: int, n: int, shard_rows: int) -> list[int]:
    """The image indices of shard k of an n-image split."""
    return list(range(k * shard_rows, min(n, (k + 1) * shard_rows)))


def caption_digest(captions: list[str]) -> torch.Tensor:
    """sha256 of the captions (each length-prefixed) as uint8 [32]."""
    h = hashlib.sha256()
    for c in captions:
        data = c.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def shard_done(path: Path, enc_hash: str, block: list[int], digest: torch.Tensor | None = None) -> bool:
    """A finished shard of this encoder holding exactly these images (and, if given, these captions)."""
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return ((f.metadata() or {}).get("encoder_hash") == enc_hash
                    and (digest is None or torch.equal(f.get_tensor("caption_digest"), digest))
                    and f.get_tensor("indices").tolist() == list(block))
    except Exception:  # noqa: BLE001 - a torn or corrupt file is simply redone
        return False


def to_rows(hidden: torch.Tensor, mask: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden as float16, lengths int32) as stored; the mask must be a prefix and the states fit float16."""
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]):
        raise TextCacheError(f"{what}: the encoder's mask is not a prefix of each row; expected right padding")
    half = hidden.to(torch.float16)
    if not torch.isfinite(half).all():
        raise TextCacheError(f"{what}: encoder states exceed the float16 range (|x| > 65504) or are not finite; "
                             "expected states float16 can store")
    return half.cpu().contiguous(), lengths.to(torch.int32).cpu()


@torch.no_grad()
def encode_captions(encoder, captions_of: Callable[[list[int]], list[str]], shards: Iterable[int], out_dir: Path,
                    *, n: int, shard_rows: int, batch_size: int, show_progress: bool = True
                    ) -> tuple[list[dict], int, int]:
    """Encode shards `shards` of an n-caption split into `out_dir`; `captions_of(indices)` gives the captions of
    a shard's image indices (called once per shard, in shard order). Finished shards of this encoder with the same
    indices and captions are kept; each shard is written atomically in batches of `batch_size` captions.
    Returns (shard records, captions encoded, finished shards reused)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = list(shards)
    records, encoded, reused = [], 0, 0
    bar = progress(total=len(shards), desc="cache-text shards", enabled=show_progress)
    for k in shards:
        path, block = out_dir / shard_name(k), shard_rows_of(k, n, shard_rows)
        for stale in out_dir.glob(f".{shard_name(k)}.*.tmp"):  # temp files of a killed run
            stale.unlink(missing_ok=True)
        captions = list(captions_of(block))
        if len(captions) != len(block):
            raise TextCacheError(f"{path}: got {len(captions)} captions for images {block[0]}..{block[-1]}; "
                                 f"expected {len(block)} (one per train image)")
        digest = caption_digest(captions)
        records.append({"file": shard_name(k), "rows": len(block)})
        if shard_done(path, encoder.hash, block, digest):
            reused += 1
            bar.update(1)
            continue
        hidden, lengths = [], []
        for b in range(0, len(block), batch_size):
            h, m = to_rows(*encoder.encode(captions[b:b + batch_size]), str(path))
            hidden.append(h), lengths.append(m)
        encoded += len(block)
        write_safetensors_atomic(path, {"hidden": torch.cat(hidden), "lengths": torch.cat(lengths),
                                        "indices": torch.tensor(block, dtype=torch.int64), "caption_digest": digest},
                                 metadata={"encoder_hash": encoder.hash})
        bar.update(1)
    bar.close()
    return records, encoded, reused


def cache_manifest(encoder, count: int, records: list[dict], **extra) -> dict:
    """The manifest.json of a text cache made by `encoder` (a `TextEncoder`) from shard `records`."""
    return {"task": "text", "encoder": encoder.name, "encoder_class": type(encoder.model).__name__,
            "encoder_hash": encoder.hash, "max_tokens": encoder.max_tokens, "dim": encoder.dim, "dtype": "float16",
            "count": count, "shards": records, **extra}


def _memmap(path: Path) -> dict[str, np.ndarray]:
    try:
        return memmap_safetensors(path)
    except LatentCacheError as e:  # its text names the latent cache; keep what went wrong, name this cache
        what = str(e).split(": ", 1)[-1].split("; expected")[0]
        raise TextCacheError(f"{path}: {what}; expected a safetensors text shard ({RERUN})") from None


class TextCache(torch.utils.data.Dataset):
    """Cached caption states by train image index: `get(i)` -> (hidden float32 [L, D], mask bool [L]).

    Shards are memory-mapped on first use in each process (a forked or unpickled copy maps its own); pickling
    carries paths and offsets, never the states. `encoder_hash`: refuse a cache made by another encoder.
    """

    def __init__(self, folder: Path, encoder_hash: str | None = None):
        self.dir = Path(folder)
        path = self.dir / MANIFEST
        try:
            m = read_json(path, "text cache manifest")
        except FileNotFoundError:
            raise TextCacheError(f"{path}: text cache manifest not found; run `aligntok cache-text` first") from None
        if not isinstance(m, dict) or m.get("task") != "text":
            raise TextCacheError(f"{path}: task {m.get('task') if isinstance(m, dict) else None!r}; expected a text "
                                 f"cache (set task: text and {RERUN})")
        for key in ("encoder_hash", "max_tokens", "dim", "count", "shards"):
            if key not in m:
                raise TextCacheError(f"{path}: manifest lacks '{key}'; {RERUN}")
        if encoder_hash is not None and m["encoder_hash"] != encoder_hash:
            raise TextCacheError(f"{path}: text cache was made by encoder {m['encoder_hash']} ({m.get('encoder')}), "
                                 f"but the current encoder is {encoder_hash}; {RERUN}")
        self.manifest, self.encoder_hash, self.encoder = m, m["encoder_hash"], m.get("encoder")
        self.max_tokens, self.dim = int(m["max_tokens"]), int(m["dim"])
        self._paths = [self.dir / s["file"] for s in m["shards"]]
        rows = [int(s["rows"]) for s in m["shards"]]
        self._start = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]).astype(np.int64)
        if int(self._start[-1]) != int(m["count"]):
            raise TextCacheError(f"{path}: shards hold {int(self._start[-1])} rows; expected count {m['count']}")
        self._maps: list[dict] | None = None
        self._check(rows)

    def _check(self, rows: list[int]) -> None:
        """Every shard now, with one-line errors (not later in a DataLoader worker)."""
        expect = {"hidden": ("<f2", (self.max_tokens, self.dim)), "lengths": ("<i4", ()), "indices": ("<i8", ())}
        for path, maps, n, start in zip(self._paths, self._shards(), rows, self._start):
            for key, (dtype, tail) in expect.items():
                a = maps.get(key)
                if a is None or a.dtype != np.dtype(dtype) or a.shape != (n, *tail):
                    got = "missing" if a is None else f"{a.dtype} {list(a.shape)}"
                    raise TextCacheError(f"{path}: tensor '{key}' is {got}; expected {np.dtype(dtype)} "
                                         f"{[n, *tail]} ({RERUN})")
            if not np.array_equal(maps["indices"], np.arange(start, start + n)):
                raise TextCacheError(f"{path}: indices are not images {start}..{start + n - 1}; {RERUN}")
            lengths = maps["lengths"]
            if n and (lengths.min() < 0 or lengths.max() > self.max_tokens):
                raise TextCacheError(f"{path}: lengths outside [0, {self.max_tokens}]; {RERUN}")
            with safe_open(str(path), framework="pt") as f:
                got = (f.metadata() or {}).get("encoder_hash")
            if got != self.encoder_hash:
                raise TextCacheError(f"{path}: shard made by encoder {got}; expected {self.encoder_hash} (manifest); "
                                     f"{RERUN}")

    def _shards(self) -> list[dict]:
        if self._maps is None or self._pid != os.getpid():
            self._maps, self._pid = [_memmap(p) for p in self._paths], os.getpid()
        return self._maps

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}  # pickling a memmap would copy its data

    def __len__(self) -> int:
        return int(self._start[-1])

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"caption {i} out of range [0, {len(self)})")
        f = int(np.searchsorted(self._start, i, side="right")) - 1
        shard, off = self._shards()[f], int(i) - int(self._start[f])
        hidden = torch.from_numpy(np.array(shard["hidden"][off], dtype=np.float32))  # a copy of one row
        return hidden, torch.arange(self.max_tokens) < int(shard["lengths"][off])

    __getitem__ = get
