"""aligntok: align a vision foundation encoder into a diffusion tokenizer, train LightningDiT on its latents."""

__version__ = "0.1.0"
