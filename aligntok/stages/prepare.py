"""`aligntok prepare`: source images -> parquet shards + manifest.json under data/<name>/.

Runs in `data.num_workers` processes (null = every core). Shards are built under checkpoints/prepare/<name>/
and hard-linked into data/<name>/; after a kill, a rerun keeps the finished shards and builds the rest.
"""
from __future__ import annotations

from pathlib import Path

from aligntok.config import ConfigError, Params
from aligntok.stages.common import CHECKPOINTS, data_dir, write_metrics
from aligntok.tracking import stage_run


def run(params: Params, args) -> int:
    from aligntok.data.sources import DataError, prepare_dataset, resolve_workers

    d = params.data
    out = data_dir(params)
    with stage_run(params, "prepare") as tracker:
        try:
            # shards are built (and kept for a resume) outside the DVC out, which DVC deletes before a rerun
            manifest = prepare_dataset(d.source, out, root=Path(d.root) if d.root else None, resolution=d.resolution,
                                       num_images=d.num_images, num_classes=d.num_classes,
                                       val_fraction=d.val_fraction, shard_rows=d.shard_rows, seed=params.seed,
                                       max_image_pixels=d.max_image_pixels, workers=resolve_workers(d.num_workers),
                                       work_dir=CHECKPOINTS / "prepare" / d.name,
                                       val_root=Path(d.val_root) if d.val_root else None,
                                       caption_column=d.caption_column, task=params.task)
        except DataError as e:
            raise ConfigError(str(e)) from None
        counts = {f"{split}_images": sum(c.values()) if isinstance(c, dict) else c
                  for split, c in manifest["counts"].items()}
        metrics = {**counts, "skipped": len(manifest["skipped"]), "num_classes": manifest["num_classes"],
                   "content_hash": manifest["content_hash"]}
        write_metrics("prepare", metrics, tracker)
        tracker.log_artifact(out / "manifest.json")
    print(f"prepared {counts} into {out} ({len(manifest['skipped'])} skipped)")
    return 0
