"""`aligntok sample`: a labelled PNG grid, or (`--npz N`) N uint8 images in ADM's .npz layout.

Batch mode splits sample indices across ranks without duplicates; sample i's label and noise depend only on
(seed, i), so 1 or N ranks produce the same set of images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aligntok.config import Params
from aligntok.generate import labelled_grid, load_generator, sample_labels, to_uint8_nhwc
from aligntok.stages.common import DIT_DIR, tokenizer_dir
from aligntok.train.dist import barrier, cleanup, init_distributed


def generate_npz(gen, params: Params, n: int, out: Path, *, rank: int, world: int, cfg_scale: float | None,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Writes `out` (rank 0, after all ranks finished their parts); returns (images, labels) on rank 0."""
    from aligntok.data.dataset import partition
    from aligntok.eval.npz import load_npz_samples, save_npz_samples

    labels = sample_labels(n, gen.config["num_classes"], params.eval.labels, params.sample.seed)
    mine = list(partition(n, rank, world))
    imgs = []
    for b in range(0, len(mine), batch_size):
        idx = mine[b:b + batch_size]
        imgs.append(to_uint8_nhwc(gen.images(labels[idx], idx, params.sample, cfg_scale)))
    part = out.with_name(f".{out.stem}.rank{rank}.npz")
    save_npz_samples(part, np.concatenate(imgs) if imgs else np.zeros((0, 1, 1, 3), np.uint8), labels[mine].numpy())
    barrier()
    if rank != 0:
        return None
    parts = [load_npz_samples(out.with_name(f".{out.stem}.rank{r}.npz")) for r in range(world)]
    order = np.concatenate([np.asarray(list(partition(n, r, world))) for r in range(world)])
    images = np.concatenate([p[0] for p in parts if len(p[0])])[np.argsort(order)]
    save_npz_samples(out, images, labels.numpy())
    for r in range(world):
        out.with_name(f".{out.stem}.rank{r}.npz").unlink(missing_ok=True)
    return images, labels.numpy()


def run(params: Params, args) -> int:
    from aligntok.data.shards import read_manifest
    from aligntok.stages.common import data_dir

    dist = init_distributed(params.launcher.device)
    gen = load_generator(DIT_DIR, tokenizer_dir(3), dist.device)
    if args.npz:
        out = Path(args.npz_out)
        generate_npz(gen, params, args.npz, out, rank=dist.rank, world=dist.world_size,
                     cfg_scale=args.cfg_scale, batch_size=params.eval.batch_size)
        if dist.is_main:
            print(f"wrote {args.npz} samples to {out}")
    elif dist.is_main:
        c = gen.config["num_classes"]
        per = 4
        labels = torch.arange(min(c, 10)).repeat_interleave(per)
        images = to_uint8_nhwc(gen.images(labels, list(range(len(labels))), params.sample, args.cfg_scale))
        order = np.arange(len(labels)).reshape(-1, per).T.reshape(-1)  # one class per column
        names = read_manifest(data_dir(params)).get("class_names")
        grid = labelled_grid(images[order], labels[order].tolist(), names, cols=min(c, 10))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.out)
        print(f"wrote {args.out}")
    cleanup()
    return 0
