"""Flow matching (training loss) and ODE sampling with classifier-free guidance."""
