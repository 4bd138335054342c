"""Flow matching (training loss, LightningDiT's t=0-noise convention) and ODE sampling with classifier-free guidance."""
