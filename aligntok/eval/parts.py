"""Generated samples as resumable part files: <root>/<key>/part-<variant>-<start>.npz.

Sample i's label and initial noise depend only on (seed, i) (`aligntok.generate`), and part k always holds
the indices [k * size, (k + 1) * size) made as one batch, so a part's pixels depend neither on the number of
ranks nor on which rank made it: ranks split the missing parts between them, and a killed run goes on with the
parts it lacks. <key> hashes everything else that decides the pixels (DiT weights, its config and latent stats,
the tokenizer, the sampler, label mode, part size, device type and autocast); the variant (CFG scale) is in the
file name, so a new eval.cfg_scale keeps the unguided parts.

A part holds the uint8 images (arr_0, ADM layout), labels (arr_1), optionally the images' features and logits
and their extractor's tag, and a JSON meta (key, variant, range, seconds spent). It is written atomically and
checked in full (zip CRC, key, range, labels, shapes, finite features) before reuse; anything else is remade.
Features of a different extractor are recomputed from the stored images, without sampling again.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aligntok.io import write_bytes_atomic

KEY_VERSION = 1  # bump when the part layout or the pixel pipeline changes


@dataclass(frozen=True)
class Variant:
    suffix: str  # metric key suffix: "" (no guidance) or "_cfg"
    cfg_scale: float

    @property
    def tag(self) -> str:
        return f"cfg{self.cfg_scale:g}"


@dataclass(frozen=True)
class Part:
    variant: Variant
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def sample_key(gen, params, device: torch.device) -> str:
    """Digest of everything, other than the sample index and CFG scale, that decides a sample's pixels."""
    s = params.sample
    blob = {"version": KEY_VERSION, "dit": gen.dit_hash, "config": gen.config,
            "sample": {"steps": s.steps, "method": s.method, "cfg_channels": s.cfg_channels,
                       "cfg_interval_start": s.cfg_interval_start, "timestep_shift": s.timestep_shift, "seed": s.seed},
            "labels": params.eval.labels, "part_size": params.eval.batch_size, "device": device.type,
            "amp": params.eval.amp and device.type == "cuda"}
    if getattr(gen, "prompt_digest", ""):  # text DiT: the prompts (and their encoder) decide the pixels too
        blob["prompts"] = gen.prompt_digest
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_parts(variant: Variant, n: int, size: int) -> list[Part]:
    return [Part(variant, a, min(n, a + size)) for a in range(0, n, size)]


class PartStore:
    def __init__(self, root: Path, key: str, num_classes: int, label_mode: str, seed: int):
        self.root, self.key, self.dir = Path(root), key, Path(root) / key
        self.num_classes, self.label_mode, self.seed = num_classes, label_mode, seed

    def path(self, part: Part) -> Path:
        return self.dir / f"part-{part.variant.tag}-{part.start:08d}.npz"

    def labels(self, part: Part) -> np.ndarray:
        from aligntok.generate import sample_labels
        return sample_labels(range(part.start, part.stop), self.num_classes, self.label_mode, self.seed).numpy()

    def read(self, part: Part) -> dict | None:
        """The part's arrays and meta if the file is complete and belongs to exactly this part, else None."""
        try:
            with np.load(self.path(part), allow_pickle=False) as f:
                rec = {k: f[k] for k in f.files}
            meta = json.loads(rec.pop("meta").tobytes().decode())
        except Exception:  # noqa: BLE001 - missing, torn, foreign: all mean "make it again"
            return None
        imgs, labels = rec.get("arr_0"), rec.get("arr_1")
        ok = (isinstance(meta, dict) and meta.get("key") == self.key and meta.get("variant") == part.variant.tag
              and meta.get("start") == part.start and meta.get("stop") == part.stop
              and imgs is not None and imgs.dtype == np.uint8 and imgs.ndim == 4 and imgs.shape[0] == part.size
              and imgs.shape[-1] == 3 and labels is not None and np.array_equal(labels, self.labels(part)))
        return {**rec, "meta": meta} if ok else None

    @staticmethod
    def has_features(rec: dict, tag: str | None) -> bool:
        if tag is None:
            return True
        f, lg, n = rec.get("features"), rec.get("logits"), len(rec["arr_0"])
        return (rec["meta"].get("features") == tag and f is not None and lg is not None
                and f.dtype == lg.dtype == np.float64 and f.ndim == lg.ndim == 2 and len(f) == len(lg) == n
                and bool(np.isfinite(f).all() and np.isfinite(lg).all()))

    def write(self, part: Part, rec: dict) -> None:
        arrays = {k: v for k, v in rec.items() if k != "meta"}
        meta = {**rec["meta"], "key": self.key, "variant": part.variant.tag, "start": part.start, "stop": part.stop}
        buf = io.BytesIO()
        np.savez(buf, **arrays, meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8))
        write_bytes_atomic(self.path(part), buf.getvalue())

    def plan(self, parts: list[Part], tag: str | None) -> list[tuple[str, Part]]:
        """What is left to do: ("make", part) for missing/invalid parts, ("features", part) for parts whose
        images are fine but whose features are missing or from another extractor. Run on one rank."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".part-*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        todo = []
        for p in parts:
            rec = self.read(p)
            if rec is None:
                todo.append(("make", p))
            elif not self.has_features(rec, tag):
                todo.append(("features", p))
        return todo

    def prune_other_keys(self) -> list[str]:
        """Remove part folders of other keys (an older DiT, other sampler settings): at 256 px one key holds
        ~10 GB per 50K samples. Returns what was removed."""
        removed = []
        for d in self.root.glob("*"):
            if d.is_dir() and d.name != self.key and re.fullmatch(r"[0-9a-f]{16}", d.name):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def do_part(store: PartStore, action: str, part: Part, gen, sample_cfg, extractor, amp: bool) -> int:
    """Makes ("make") or re-features ("features") one part; returns how many samples were generated."""
    from aligntok.eval.features import extract
    from aligntok.generate import to_uint8_nhwc

    labels = store.labels(part)
    rec = store.read(part) if action == "features" else None
    generated = 0
    if rec is None:
        t0 = time.perf_counter()
        x = gen.images(torch.from_numpy(labels), list(range(part.start, part.stop)), sample_cfg,
                       part.variant.cfg_scale, amp=amp)
        images = to_uint8_nhwc(x)
        _sync(gen.device)
        rec = {"arr_0": images, "arr_1": labels, "meta": {"gen_seconds": time.perf_counter() - t0}}
        generated = part.size
    if extractor is not None:
        t0 = time.perf_counter()
        rec["features"], rec["logits"] = extract(extractor, rec["arr_0"], batch_size=part.size)
        rec["meta"] = {**rec["meta"], "features": extractor.tag, "feature_seconds": time.perf_counter() - t0}
    store.write(part, rec)
    return generated


def run_parts(store: PartStore, parts: list[Part], coord, gen, sample_cfg, extractor, amp: bool,
              label: str = "evaluate") -> dict[str, int] | None:
    """Rank 0 lists what is left; ranks take it round-robin (balanced even after a resume) and make their share.
    Returns the samples generated in this run per variant suffix, summed over ranks, on rank 0 (None elsewhere);
    when it returns on rank 0, every rank has written its parts."""
    todo = coord.broadcast(store.plan(parts, extractor.tag if extractor is not None else None)
                           if coord.is_main else None)
    mine = todo[coord.rank::coord.world_size]
    done: dict[str, int] = {}
    t0 = time.perf_counter()
    for k, (action, part) in enumerate(mine, 1):
        done[part.variant.suffix] = done.get(part.variant.suffix, 0) + do_part(
            store, action, part, gen, sample_cfg, extractor, amp)
        if coord.is_main:
            left = (time.perf_counter() - t0) / k * (len(mine) - k)
            print(f"{label}: part {part.variant.tag} [{part.start}, {part.stop}) {action} ({k}/{len(mine)} on "
                  f"rank 0 of {coord.world_size}, ~{left:.0f}s left)", flush=True)
    views = coord.gather(done)
    if views is None:
        return None
    return {s: sum(v.get(s, 0) for v in views) for s in {p.variant.suffix for p in parts}}
