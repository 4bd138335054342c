"""The score of the last `mutmut run` (make mutants), from mutants/mutmut-cicd-stats.json.

Two figures: killed among the mutants a selected test runs (the tests' strength), and killed among all mutants
(also counting mutants in code that no selected fast test reaches: a coverage gap, not a survivor).
Not collected by pytest (no test_ prefix)."""
import json
from pathlib import Path

s = json.loads(Path("mutants/mutmut-cicd-stats.json").read_text())
killed = s["killed"] + s["timeout"] + s["segfault"]
run = killed + s["survived"] + s["suspicious"]
print(f"mutants: {s['total']}; run by a selected test: {run}; killed {killed}, survived {s['survived']}, "
      f"suspicious {s['suspicious']}; reached by no selected test: {s['no_tests']}; skipped: {s['skipped']}")
print(f"mutation score: {100 * killed / max(run, 1):.1f} % of the mutants the tests run, "
      f"{100 * killed / max(run + s['no_tests'], 1):.1f} % of all")
