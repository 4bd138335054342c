"""`aligntok cache-text`: encode the train split's captions with the frozen text encoder into a text cache.

As cache-latents does: shards are written under checkpoints/cache-text/<encoder hash>-<data content hash>/ (DVC
deletes a stage's outs before it runs, so a resume lives elsewhere), each atomically; a rerun keeps the finished
shards of the same encoder, images and captions, and says how many it reused. Shard k holds images
[k * shard_rows, (k + 1) * shard_rows) whatever the world size; each rank encodes a contiguous run of shards, then
rank 0 checks that every shard is there and hard-links the cache into outputs/text (`aligntok.data.text_cache`).
The class task has no captions: the stage writes a manifest saying so and stops.
"""
from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from aligntok.config import Params
from aligntok.io import replace_dir, write_json_atomic
from aligntok.stages.common import CHECKPOINTS, TEXT_DIR, data_dir, write_metrics

# torch, transformers and the cache module are imported where used: the class task's run stops in well under a second

# captions per shard unless params give `text.shard_rows`: 24 MiB of 32 x 384 fp16 states, 256 MiB at 4096 dims
SHARD_ROWS = 1024


class SequentialCaptions:
    """`captions_of` for `encode_captions` over one pass of a caption stream: blocks must come in rising order
    (a rank's contiguous shards); captions before a block are skipped, never held."""

    def __init__(self, captions: Iterable[str], where: str):
        self.it, self.pos, self.where = iter(captions), 0, where

    def __call__(self, block: list[int]) -> list[str]:
        if not block:
            return []
        if block[0] < self.pos:
            raise ValueError(f"SequentialCaptions: block {block[0]} comes before position {self.pos}")
        next(itertools.islice(self.it, block[0] - self.pos, block[0] - self.pos), None)
        out = list(itertools.islice(self.it, len(block)))
        self.pos = block[0] + len(out)
        for i, c in enumerate(out, start=block[0]):
            if not isinstance(c, str):
                from aligntok.data.text_cache import TextCacheError
                raise TextCacheError(f"{self.where}: caption of train image {i} is {type(c).__name__}; expected a "
                                     "string")
        return out


def expected_shards(work: Path, n: int, shard_rows: int, enc_hash: str, captions) -> list[str]:
    """Every shard of an n-caption split, each checked for its encoder, image indices and captions."""
    from aligntok.data.text_cache import RERUN, TextCacheError, caption_digest, shard_done, shard_name, shard_rows_of
    names = []
    for k in range(-(-n // shard_rows)):
        block = shard_rows_of(k, n, shard_rows)
        if not shard_done(work / shard_name(k), enc_hash, block, caption_digest(captions(block))):
            raise TextCacheError(f"{work / shard_name(k)}: missing or not this run's shard; {RERUN}")
        names.append(shard_name(k))
    return names


def _publish(files: dict[str, Path], manifest: dict) -> None:
    """outputs/text replaced in one step by a folder holding `files` (hard links) and the manifest."""
    tmp = TEXT_DIR.with_name(".text.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, src in files.items():
        _link_or_copy(src, tmp / name)
    write_json_atomic(tmp / "manifest.json", manifest)
    replace_dir(tmp, TEXT_DIR)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def run(params: Params, args) -> int:
    if params.task == "class":
        if os.environ.get("RANK", "0") == "0":  # under torchrun: one writer
            from aligntok.tracking import stage_run
            with stage_run(params, "cache-text") as tracker:  # a child run like every stage: ablations compare alike
                _publish({}, {"task": "class", "reason": "task is class: the DiT is conditioned on class labels, "
                                                         "not captions; nothing to encode"})
                write_metrics("cache-text", {"captions": 0, "encoded_this_run": 0, "captions_per_s": 0.0,
                                             "task": "class"}, tracker)
            print(f"cache-text: task class, no captions to encode ({TEXT_DIR / 'manifest.json'} says so)")
        return 0

    from aligntok.data.captions import iter_captions
    from aligntok.data.dataset import contiguous_part
    from aligntok.data.shards import read_manifest
    from aligntok.data.text_cache import cache_manifest, encode_captions, shard_rows_of
    from aligntok.models.text_encoder import TextEncoder
    from aligntok.tracking import stage_run
    from aligntok.train.dist import barrier, cleanup, init_distributed

    dist = init_distributed(params.launcher.device, timeout_s=params.launcher.timeout_s)
    t = params.text
    encoder = TextEncoder.load(t.encoder, t.max_tokens, dist.device)  # a missing encoder: one line, before work
    folder = data_dir(params)
    data_manifest = read_manifest(folder)
    n = sum(int(s["rows"]) for s in data_manifest["shards"]["train"])
    work = CHECKPOINTS / "cache-text" / f"{encoder.hash}-{data_manifest['content_hash'][:12]}"
    work.mkdir(parents=True, exist_ok=True)
    with stage_run(params, "cache-text") as tracker:
        t0 = time.perf_counter()
        per_shard = getattr(t, "shard_rows", SHARD_ROWS)
        mine = contiguous_part(-(-n // per_shard), dist.rank, dist.world_size)  # as cache-latents' rank_shards
        records, encoded, reused = encode_captions(
            encoder, SequentialCaptions(iter_captions(folder, "train"), str(folder)), mine, work, n=n,
            shard_rows=per_shard, batch_size=t.batch_size, show_progress=dist.is_main)
        if reused:
            print(f"cache-text: rank {dist.rank} reused {reused} of {len(records)} finished shards from {work}",
                  flush=True)
        seconds = time.perf_counter() - t0
        barrier()
        if dist.is_main:
            captions = SequentialCaptions(iter_captions(folder, "train"), str(folder))
            shards = expected_shards(work, n, per_shard, encoder.hash, captions)
            records = [{"file": s, "rows": len(shard_rows_of(k, n, per_shard))} for k, s in enumerate(shards)]
            manifest = cache_manifest(encoder, n, records, data_content_hash=data_manifest["content_hash"])
            _publish({s: work / s for s in shards}, manifest)
            metrics = {"captions": n, "encoded_this_run": encoded, "shards": len(shards),
                       "captions_per_s": encoded / seconds if encoded else 0.0,
                       "encoder": t.encoder, "encoder_hash": encoder.hash}
            write_metrics("cache-text", metrics, tracker)
            print(f"cache-text: {n} captions -> {TEXT_DIR} ({encoded} encoded this run, "
                  f"{metrics['captions_per_s']:.1f} captions/s)")
    cleanup()
    return 0
