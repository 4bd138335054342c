"""Progress bars for the long loops that are not training steps (prepare's shards, latent caching, features).

On ImageNet these run for hours, so they report progress; but a bar that redraws ten times a second floods a log
file or a Prefect run log. The bar refreshes at most every TQDM_MININTERVAL seconds (default 10) and only on the
process that should speak (rank 0).
"""
from __future__ import annotations

import os
from typing import Iterable

from tqdm import tqdm


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", enabled: bool = True):
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=float(os.environ.get("TQDM_MININTERVAL", "10")))
