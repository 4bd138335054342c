"""`aligntok cache-latents`: encode the train split with the final tokenizer into latent shards.

Shards are written first under checkpoints/cache-latents/<tokenizer hash>/ (DVC deletes a stage's outs before
it runs, so a resume must live elsewhere); a rerun skips finished shards (same tokenizer, same image indices) and
says how many it reused. A shard is written to a temp name and renamed into place, so a kill or a full disk never
leaves a file that looks finished; a failed write stops the stage with one line naming the shard.
Shard k holds images [k * shard_rows, (k + 1) * shard_rows) whatever the world size, so the cache (names and bytes)
is the same on 1 GPU or 16, and a resume on another GPU count reuses every finished shard. Each rank encodes a
contiguous run of shards, its loader processes (`data.num_workers`; null = this rank's share of the CPUs it may
use) decoding a row group at a time while the tokenizer encodes; rank 0 then computes latent_stats over all shards
and hard-links the finished cache into outputs/latents, where `LatentDataset` memory-maps it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open

from aligntok.config import Params
from aligntok.data.latents import MANIFEST, compute_stats
from aligntok.data.shards import ROW_GROUP_ROWS
from aligntok.fingerprint import tokenizer_hash
from aligntok.io import replace_dir, write_json_atomic, write_safetensors_atomic
from aligntok.progress import progress
from aligntok.stages.common import CHECKPOINTS, LATENTS_DIR, data_dir, tokenizer_dir, write_metrics
from aligntok.train.dist import barrier, cleanup, init_distributed
from aligntok.train.loop import bf16_autocast
from aligntok.tracking import stage_run

LOAD_ROWS = ROW_GROUP_ROWS  # images a loader process decodes at a time: one stored row group


def _shard_done(path: Path, tok_hash: str, block: list[int]) -> bool:
    """A finished shard of this tokenizer holding exactly these images (a layout change redoes it)."""
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return ((f.metadata() or {}).get("tokenizer_hash") == tok_hash
                    and f.get_tensor("indices").tolist() == list(block))
    except Exception:  # noqa: BLE001 - a torn/corrupt file is simply redone
        return False


def shard_name(k: int) -> str:
    return f"latents-{k:05d}.safetensors"


def shard_rows_of(k: int, n: int, shard_rows: int) -> list[int]:
    """The image indices of shard k of an n-image split."""
    return list(range(k * shard_rows, min(n, (k + 1) * shard_rows)))


def rank_shards(n: int, shard_rows: int, rank: int, world_size: int) -> range:
    """The shards rank `rank` encodes: a contiguous run of the split's shards."""
    from aligntok.data.dataset import contiguous_part
    return contiguous_part(-(-n // shard_rows), rank, world_size)


def image_batches(dataset, batches: list[list[int]], num_workers: int, device: torch.device):
    """(images on `device`, labels) of each index list of `batches`, in order, the same tensors for any worker
    count: `num_workers` loader processes (0: this one) decode a stored row group (`LOAD_ROWS`) at a time, each
    group read once, into pinned memory on CUDA; the pieces of a batch are copied over and joined there."""
    pieces = [rows[c:c + LOAD_ROWS] for rows in batches for c in range(0, len(rows), LOAD_ROWS)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=pieces, num_workers=num_workers,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator())  # keeps the global RNG untouched
    loaded = iter(loader)
    for rows in batches:
        parts = [next(loaded) for _ in range(-(-len(rows) // LOAD_ROWS))]
        yield (torch.cat([x.to(device, non_blocking=True) for x, _ in parts]),
               [y for _, labels in parts for y in labels.tolist()])


@torch.no_grad()
def encode_split(tokenizer, dataset, shards: range, out_dir: Path, *, shard_rows: int, batch_size: int,
                 hflip: bool, tok_hash: str, device: torch.device, num_workers: int = 0,
                 show_progress: bool = True) -> tuple[list[dict], int, int]:
    """Encode shards `shards` of `dataset` (see `shard_rows_of`) with images decoded by `num_workers` loader
    processes; returns (shard records, images encoded, finished shards reused from an earlier run)."""
    records, todo, encoded = [], [], 0
    for k in shards:
        for stale in out_dir.glob(f".{shard_name(k)}.*.tmp"):  # temp files of a killed run
            stale.unlink(missing_ok=True)
        block = shard_rows_of(k, len(dataset), shard_rows)
        records.append({"file": shard_name(k), "rows": len(block)})
        if not _shard_done(out_dir / shard_name(k), tok_hash, block):
            todo.append((k, block))
    bar = progress(total=len(shards), desc="cache-latents shards", enabled=show_progress)
    bar.update(len(shards) - len(todo))
    batches = [[block[b:b + batch_size] for b in range(0, len(block), batch_size)] for _, block in todo]
    with contextlib.closing(image_batches(dataset, [r for bs in batches for r in bs], num_workers, device)) as it:
        for (k, block), shard_batches in zip(todo, batches):
            zs, zfs, labels = [], [], []
            for _ in shard_batches:
                x, y = next(it)
                with bf16_autocast(device):  # CUDA only: CPU caches stay bit-identical
                    zs.append(tokenizer.encode(x).float().cpu())
                    if hflip:
                        zfs.append(tokenizer.encode(x.flip(-1)).float().cpu())
                labels += y
                encoded += len(y)
            # contiguous: a ViT encoder's feature map (DINOv2) comes out channels-last, and safetensors refuses that
            tensors = {"latents": torch.cat(zs).contiguous(), "labels": torch.tensor(labels, dtype=torch.int64),
                       "indices": torch.tensor(block, dtype=torch.int64)}
            if hflip:
                tensors["latents_flip"] = torch.cat(zfs).contiguous()
            write_safetensors_atomic(out_dir / shard_name(k), tensors, metadata={"tokenizer_hash": tok_hash})
            bar.update(1)
    bar.close()
    return records, encoded, len(shards) - len(todo)


def run(params: Params, args) -> int:
    from aligntok.data.dataset import ShardDataset, loader_workers
    from aligntok.data.shards import read_manifest
    from aligntok.models.tokenizer import AlignTokenizer

    dist = init_distributed(params.launcher.device, timeout_s=params.launcher.timeout_s)
    model_dir = tokenizer_dir(3)
    # load first: a missing or mismatched model.safetensors is reported by the loader in one line
    tokenizer = AlignTokenizer.from_pretrained(model_dir).to(dist.device).eval()
    tok_hash = tokenizer_hash(model_dir)
    dataset = ShardDataset(data_dir(params), "train")
    data_manifest = read_manifest(data_dir(params))
    work = CHECKPOINTS / "cache-latents" / f"{tok_hash}-{data_manifest['content_hash'][:12]}"
    work.mkdir(parents=True, exist_ok=True)
    with stage_run(params, "cache-latents") as tracker:
        t0 = time.perf_counter()
        per_shard = params.latents.shard_rows
        mine = rank_shards(len(dataset), per_shard, dist.rank, dist.world_size)
        records, encoded, reused = encode_split(tokenizer, dataset, mine, work, shard_rows=per_shard,
                                                batch_size=params.latents.batch_size, hflip=params.latents.hflip,
                                                tok_hash=tok_hash, device=dist.device, show_progress=dist.is_main,
                                                num_workers=loader_workers(params.data.num_workers,
                                                                           params.launcher.nproc_per_node))
        if reused:
            print(f"cache-latents: rank {dist.rank} reused {reused} of {len(records)} finished shards from {work}",
                  flush=True)
        seconds = time.perf_counter() - t0
        barrier()
        if dist.is_main:
            shards = expected_shards(work, len(dataset), per_shard, tok_hash)
            stats = compute_stats([work / s for s in shards])
            with safe_open(str(work / shards[0]), framework="pt") as f:
                shape = list(f.get_slice("latents").get_shape()[1:])
            rows = {}
            for s in shards:
                with safe_open(str(work / s), framework="pt") as f:
                    rows[s] = f.get_slice("labels").get_shape()[0]
            manifest = {"tokenizer_hash": tok_hash, "tokenizer_dir": str(model_dir),
                        "data_content_hash": data_manifest["content_hash"], "num_classes": dataset.num_classes,
                        "latent_shape": shape, "hflip": params.latents.hflip, "count": len(dataset),
                        "shards": [{"file": s, "rows": rows[s]} for s in shards], "latent_stats": stats}
            tmp = LATENTS_DIR.with_name(".latents.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for s in shards:
                _link_or_copy(work / s, tmp / s)
            write_json_atomic(tmp / MANIFEST, manifest)
            replace_dir(tmp, LATENTS_DIR)
            metrics = {"images": len(dataset), "encoded_this_run": encoded, "shards": len(shards),
                       "images_per_s": encoded / seconds if encoded else 0.0, "latent_std_mean": sum(stats["std"]) / len(stats["std"])}
            write_metrics("cache-latents", metrics, tracker)
            tracker.log_dict(stats, "latent_stats.json")
            print(f"cache-latents: {len(dataset)} images -> {LATENTS_DIR} ({encoded} encoded this run, "
                  f"{metrics['images_per_s']:.1f} img/s)")
    cleanup()
    return 0


def expected_shards(work: Path, n: int, shard_rows: int, tok_hash: str) -> list[str]:
    """Every shard of an n-image split, each checked for its tokenizer and image indices.

    A shard left with other indices (another shard_rows) or by another tokenizer is never mixed in: the cache is
    complete and exact, or the stage stops with one line.
    """
    from aligntok.data.latents import LatentCacheError
    names = []
    for k in range(-(-n // shard_rows)):
        if not _shard_done(work / shard_name(k), tok_hash, shard_rows_of(k, n, shard_rows)):
            raise LatentCacheError(f"{work / shard_name(k)}: missing or not this run's shard; "
                                   "re-run `aligntok cache-latents`")
        names.append(shard_name(k))
    return names


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
