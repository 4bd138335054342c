"""`aligntok bench text-cache`: captions/s of cache-text's writer (tokenize, encode, cast, write shards).

The encoder is loaded before the clock starts; the captions are seeded synthetic sentences of `words` words (5 to
30 by default: some reach max_tokens and are cut, as web captions are; (8, 12) is scene- or COCO-like). The encoder
runs at each batch's longest caption, so short captions encode faster.
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("a an the two three small large red green blue yellow black white striped wooden metal glass old young "
         "dog cat bird horse car bus train boat house tree flower mountain river beach street city kitchen table "
         "chair window person woman man child sitting standing running walking flying next to on under near behind "
         "in front of with holding wearing at the left right top bottom background sunny cloudy night").split()


def synthetic_captions(n: int, seed: int = 0, words: tuple[int, int] = (5, 30)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(n)]


def bench_text_cache(encoder: str = "all-MiniLM-L6-v2", captions: int = 512, max_tokens: int = 32,
                     batch_size: int = 64, shard_rows: int = 256, device: str | torch.device = "cpu",
                     words: tuple[int, int] = (5, 30)) -> float:
    """Captions per second `encode_captions` writes into a fresh cache in a temp folder."""
    from aligntok.data.text_cache import encode_captions
    from aligntok.models.text_encoder import TextEncoder

    enc = TextEncoder.load(encoder, max_tokens, device)
    texts = synthetic_captions(captions, words=words)
    with tempfile.TemporaryDirectory() as tmp:
        enc.encode(texts[:batch_size])  # warm-up: first-call allocations and kernel selection
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, encoded, _ = encode_captions(enc, lambda block: [texts[i] for i in block],
                                        range(-(-captions // shard_rows)), Path(tmp), n=captions,
                                        shard_rows=shard_rows, batch_size=batch_size, show_progress=False)
        return encoded / (time.perf_counter() - t0)
