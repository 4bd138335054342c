"""The text task's DiT training set: each cached latent with its caption's cached encoder states.

Both caches are indexed by train-split image: latent shard rows follow the image index (cache-latents) and text
cache row i is image i's caption (cache-text). Item `v * N + i` (variant v of image i, as in `LatentDataset`) is
(latent, caption states (L, D), caption mask (L,)); a flipped latent keeps its image's caption. Both are read from
memory maps one row at a time, so memory does not grow with the data set.
"""
from __future__ import annotations

import torch

from aligntok.data.latents import LatentCacheError, LatentDataset


class CaptionedLatents(torch.utils.data.Dataset):
    def __init__(self, latents: LatentDataset, text):
        if len(text) != latents.num_source_images:
            raise LatentCacheError(f"{getattr(text, 'dir', 'the text cache')}: {len(text)} cached captions, but the latent cache {latents.dir} holds "
                                   f"{latents.num_source_images} images; re-run `aligntok cache-text` (both must be "
                                   "made from the same prepared train split)")
        self.latents, self.text = latents, text
        # what the training loop's sampler and epoch count read
        self.num_source_images, self.num_variants = latents.num_source_images, latents.num_variants
        self.manifest, self.stats = latents.manifest, latents.stats

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, _ = self.latents[i]
        hidden, mask = self.text.get(int(i) % self.num_source_images)
        return z, hidden, mask
