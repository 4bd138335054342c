"""Run `make` from a test as a user would from a shell, also when the suite itself runs under `make test`.

A make started inside another make inherits MAKELEVEL/MAKEFLAGS: it then prints "Entering directory" lines and
takes on the outer make's flags, so a dry-run's printed plan is no longer only the recipe's commands.
"""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make(*args, cwd=ROOT, check=False):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, check=check)
