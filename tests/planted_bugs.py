"""Plant each bug that a review found the suite blind to, one at a time, and show which fast tests fail.

    python tests/planted_bugs.py            # every bug; exit 1 if any survives
    python tests/planted_bugs.py ema_inverted

Each bug is a one-line edit of the library (the exact line, so a refactor that moves it makes this script stop
and say so, rather than silently plant nothing). The file is restored afterwards whatever happens. These are the
bugs a diffusion reproduction lives or dies on and that a resume test cannot see (two runs with the same bug
agree); `make mutants` covers the same code more broadly. Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (name, file, exact line content, replacement)
BUGS = [
    ("xt_swapped", "aligntok/diffusion/flow.py",
     "xt = tb * x1 + (1 - tb) * x0", "xt = tb * x0 + (1 - tb) * x1"),
    ("model_fed_1_minus_t", "aligntok/diffusion/flow.py",
     "pred = model(xt, t, y).float()", "pred = model(xt, 1 - t, y).float()"),
    ("cosine_term_removed", "aligntok/diffusion/flow.py",
     "loss = loss + self.cosine_weight * cos", "loss = loss"),
    ("target_sign_flipped", "aligntok/diffusion/flow.py",
     "target = (x1 - x0).float()", "target = (x0 - x1).float()"),
    ("semantic_preservation_no_encoder_gradient", "aligntok/stages/tokenizer.py",
     "sp = semantic_preservation_loss(mean, z_ref, kind=self.cfg.semantic_distance)",
     "sp = semantic_preservation_loss(mean.detach(), z_ref, kind=self.cfg.semantic_distance)"),
    ("sampling_returns_normalised_latents", "aligntok/generate.py",
     'return denormalize(z.float(), c["latent_stats"])', "return z.float()"),
    ("ema_inverted", "aligntok/train/schedule.py",
     "s.lerp_(p.detach(), 1 - d)", "s.lerp_(p.detach(), d)"),
    ("cosine_lr_constant", "aligntok/train/schedule.py",
     "return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))", "return 1.0"),
]
# the fast tests that own these objectives; the CLI NaN test starts a stage and catches none of these
TESTS = ["tests/test_flow_known_values.py", "tests/test_train_known_values.py", "tests/test_lightningdit_golden.py",
         "tests/test_diffusion.py", "tests/test_latents.py"]


def plant(path: Path, line: str, replacement: str) -> str:
    """The file's original text; the planted version is written in its place."""
    text = path.read_text()
    if text.count(line) != 1:
        raise SystemExit(f"planted_bugs: {path.relative_to(ROOT)} no longer holds exactly one `{line}`; "
                         "update BUGS in tests/planted_bugs.py to the new line")
    path.write_text(text.replace(line, replacement))
    return text


def failing_tests() -> list[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          "-m", "not slow", "-k", "not exits_3", "-rf", *TESTS],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    return re.findall(r"^FAILED (\S+)", out.stdout, flags=re.M)


def main(names: list[str]) -> int:
    survived = []
    for name, rel, line, replacement in BUGS:
        if names and name not in names:
            continue
        path = ROOT / rel
        original = plant(path, line, replacement)
        try:
            failed = failing_tests()
        finally:
            path.write_text(original)
        print(f"{name}: {'CAUGHT by ' + str(len(failed)) + ' test(s)' if failed else 'SURVIVED'}", flush=True)
        for test in failed:
            print(f"    {test}")
        if not failed:
            survived.append(name)
    if survived:
        print(f"planted_bugs: {len(survived)} bug(s) survived: {', '.join(survived)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
