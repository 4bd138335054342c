"""`aligntok sample`: a labelled PNG grid, or (`--npz N`) N uint8 images in ADM's .npz layout.

Batch mode makes the samples as the resumable parts evaluate uses (`aligntok.eval.parts`, same folder and key):
ranks split the parts, sample i's label and noise depend only on (seed, i), so 1 or N ranks produce the same
images, a killed run continues, and a later evaluate with the same settings reuses them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aligntok.config import Params
from aligntok.generate import labelled_grid, load_generator, to_uint8_nhwc
from aligntok.stages.common import DIT_DIR, tokenizer_dir
from aligntok.train.dist import cleanup, init_distributed

def generate_npz(gen, params: Params, n: int, out: Path, *, coord, cfg_scale: float) -> int | None:
    """Writes `out` on rank 0 once every rank has made its parts; returns the samples generated in this run
    (rank 0; None elsewhere)."""
    from aligntok.eval.npz import save_npz_streaming
    from aligntok.eval.parts import PartStore, Variant, run_parts, sample_key, split_parts
    from aligntok.stages.evaluate import PARTS_DIR

    e = params.eval
    store = PartStore(PARTS_DIR, sample_key(gen, params, gen.device), gen.num_conditions,
                      "balanced" if gen.is_text else e.labels, params.sample.seed)
    parts = split_parts(Variant("", cfg_scale), n, e.batch_size)
    generated = run_parts(store, parts, coord, gen, params.sample, None, e.amp, label="sample")
    if not coord.is_main:
        return None
    labels = np.concatenate([store.labels(p) for p in parts])
    save_npz_streaming(out, n, (store.read(p)["arr_0"] for p in parts), labels)
    return generated[""]


def run(params: Params, args) -> int:
    from aligntok.data.shards import read_manifest
    from aligntok.eval.coord import Coord
    from aligntok.stages.common import data_dir

    dist = init_distributed(params.launcher.device, timeout_s=params.launcher.timeout_s)
    gen = load_generator(DIT_DIR, tokenizer_dir(3), dist.device)
    names = None
    if gen.is_text:  # the prompt set's prompts in turn (--npz: sample i for prompt i mod P, as evaluate)
        from aligntok.eval.t2i import attach_prompts
        names, _ = attach_prompts(gen, params, data_dir(params), args.npz or 10)
    if args.npz:
        out = Path(args.npz_out)
        scale = params.sample.cfg_scale if args.cfg_scale is None else args.cfg_scale
        made = generate_npz(gen, params, args.npz, out, coord=Coord(dist.rank, dist.world_size), cfg_scale=scale)
        if dist.is_main:
            print(f"wrote {args.npz} samples to {out} ({made} generated now, {args.npz - made} reused)")
    elif dist.is_main:
        c = gen.num_conditions
        per = 4
        labels = torch.arange(min(c, 10)).repeat_interleave(per)
        images = to_uint8_nhwc(gen.images(labels, list(range(len(labels))), params.sample, args.cfg_scale))
        order = np.arange(len(labels)).reshape(-1, per).T.reshape(-1)  # one class per column
        names = names or read_manifest(data_dir(params)).get("class_names")
        grid = labelled_grid(images[order], labels[order].tolist(), names, cols=min(c, 10), wrap=gen.is_text)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.out)
        print(f"wrote {args.out}")
    cleanup()
    return 0
