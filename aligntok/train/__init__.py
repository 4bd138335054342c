"""The one training loop (loop.py) and what it needs: distributed set-up, checkpoints, schedules, log windows."""
