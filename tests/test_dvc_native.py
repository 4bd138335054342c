"""DVC used the way DVC expects: every param settable with `dvc exp run -S`, deps that are exactly each stage's code,
metrics files that `dvc exp show` / `dvc metrics diff` can compare (numbers only)."""
import ast
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, SMOKE
from tests.test_pipeline import copy_repo, isolated_env, sh

# The committed profiles; the live params.yaml is the user's to switch (`aligntok profile ...`), and as shipped it is
# profiles/smoke.yaml (test_config.test_shipped_params_are_the_smoke_profile).
PARAMS_FILES = sorted(f"profiles/{p.name}" for p in (ROOT / "profiles").glob("*.yaml"))
# Imported by stages but never changes a result (MLflow bookkeeping, progress bars): no dep, so a fix there
# reruns nothing.
BOOKKEEPING = ("aligntok/tracking", "aligntok/progress.py")


def resolved_keys() -> set[str]:
    from aligntok.config import Params, flatten
    return set(flatten(Params().model_dump()))


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_params_file_writes_every_resolved_key(name):
    """A key left to its config.py default cannot be set with `dvc exp run -S` (DVC only edits keys it finds)."""
    from aligntok.config import flatten
    missing = sorted(resolved_keys() - set(flatten(yaml.safe_load((ROOT / name).read_text()))))
    assert not missing, f"{name} lacks {len(missing)} keys: {', '.join(missing)}"


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    for f in (path / "__init__.py", path.with_suffix(".py")):
        if f.exists():
            return f
    return None


def imported_modules(f: Path) -> set[str]:
    """aligntok modules a file imports anywhere (function-local imports too: they run when the stage runs)."""
    rel = f.relative_to(ROOT).with_suffix("").parts
    package = rel if f.name == "__init__.py" else rel[:-1]
    found = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else node.module
            found |= {base, *(f"{base}.{a.name}" for a in node.names)}
    return {m for m in found if m.split(".")[0] == "aligntok"}


def import_closure(module: str) -> set[str]:
    """Repo-relative files of `module` and everything it imports within aligntok, with their packages' __init__s
    (aligntok/__init__.py aside: it only holds the version)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        f = module_file(name)
        if f is None or f in seen:
            continue
        seen.add(f)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]
        todo += imported_modules(f)
    return {str(f.relative_to(ROOT)) for f in seen}


def code_deps(stage: dict) -> set[str]:
    """A stage's deps under aligntok/, directories expanded to their .py files."""
    files = set()
    for dep in stage["deps"]:
        path = ROOT / dep
        if dep.startswith("aligntok/"):
            files |= {str(p.relative_to(ROOT)) for p in path.rglob("*.py")} if path.is_dir() else {dep}
    return files


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_deps_are_each_stages_import_closure():
    from aligntok.cli import STAGES
    for name, stage in dvc_stages().items():
        closure = {f for f in import_closure(f"aligntok.stages.{STAGES[name]}") if not f.startswith(BOOKKEEPING)}
        deps = code_deps(stage)
        assert not closure - deps, f"{name}: imports missing from deps: {sorted(closure - deps)}"
        assert not deps - closure, f"{name}: deps it never imports: {sorted(deps - closure)}"
    for name in ("prepare", "tokenizer-stage1", "tokenizer-stage2", "tokenizer-stage3", "cache-latents"):
        assert "aligntok/models/dit.py" not in code_deps(dvc_stages()[name]), name


def test_write_metrics_keeps_strings_out_of_the_metrics_file(tmp_path, monkeypatch):
    from aligntok.stages.common import write_metrics
    monkeypatch.chdir(tmp_path)
    write_metrics("evaluate", {"gfid": 1.5, "n": 3, "protocol": {"fid_backbone": "x", "feature_dim": 64},
                               "run": {"device": "cpu", "wall_s": 2.0}, "ok": True})
    assert json.loads(Path("outputs/metrics/evaluate.json").read_text()) == {
        "gfid": 1.5, "n": 3, "protocol": {"feature_dim": 64}, "run": {"wall_s": 2.0}}
    assert json.loads(Path("outputs/protocol/evaluate.json").read_text()) == {
        "protocol": {"fid_backbone": "x"}, "run": {"device": "cpu"}, "ok": True}


def test_metrics_and_plots_reach_git_other_outputs_do_not():
    def ignored(path):
        return sh(["git", "check-ignore", "-q", path], ROOT, check=False).returncode == 0
    assert not any(ignored(p) for p in ("outputs/metrics/evaluate.json", "outputs/plots/train-dit.csv"))
    assert all(ignored(p) for p in ("outputs/eval/samples.npz", "outputs/latents/x", "outputs/reference/x",
                                    "outputs/protocol/evaluate.json"))


def test_every_stage_can_be_saved_to_the_run_cache():
    """DVC writes no run-cache entry for a stage that has an uncached out other than a metric or plot."""
    for name, stage in dvc_stages().items():
        uncached = [next(iter(o)) for o in stage.get("outs", []) if isinstance(o, dict)
                    and next(iter(o.values())).get("cache") is False]
        assert not uncached and not any(isinstance(o, dict) and next(iter(o.values())).get("persist")
                                        for o in stage.get("outs", [])), (name, uncached)


def set_args(value_of: dict) -> list[str]:
    return [a for k, v in value_of.items() for a in ("-S", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def recorded_repo(tmp_path_factory):
    """A repo copy on the smoke profile (not whatever the live params.yaml was switched to) whose dvc.lock records
    every stage as done (placeholder outs, `dvc commit`): status checks without running the DAG."""
    repo = copy_repo(tmp_path_factory.mktemp("dvc") / "aligntok")
    shutil.copyfile(SMOKE, repo / "params.yaml")
    for stage in dvc_stages().values():
        for item in [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            path = repo / (item if isinstance(item, str) else next(iter(item))).replace("${data.name}", "synthetic")
            if path.suffix in (".json", ".csv"):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}" if path.suffix == ".json" else "step,loss\n0,1\n")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "placeholder").write_text("x")
    sh(["dvc", "commit", "-f", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "recorded"], repo)
    assert "up to date" in sh(["dvc", "status"], repo).stdout
    return repo


def queued_params(repo: Path) -> dict[str, dict]:
    """Experiment name -> its params.yaml, flattened, for each experiment queued on HEAD (`dvc exp show`)."""
    from aligntok.config import flatten
    show = json.loads(sh(["dvc", "exp", "show", "--json", "--rev", "HEAD"], repo).stdout)
    head = next(row for row in show if row["rev"] != "workspace")
    return {rev["name"]: flatten(rev["data"]["params"]["params.yaml"]["data"])
            for exp in head["experiments"] or [] for rev in exp["revs"]}


def test_every_resolved_param_can_be_set_with_dvc_exp_run(recorded_repo):
    """All keys at once, each to its own value; then dit.qk_norm=true, which failed while the key was only a
    config.py default. Queued, not run: DVC applies -S when it queues, and each queued experiment's params.yaml
    must hold exactly what was set."""
    from aligntok.config import flatten, load_params
    values = flatten(load_params(recorded_repo / "params.yaml").model_dump())
    assert values["dit.qk_norm"] is False  # the smoke profile's; the second experiment turns it on
    wanted = {}
    try:
        qk_norm_on = {**values, "dit.qk_norm": True}
        for args, expected in ((set_args(values), values), (["-S", "dit.qk_norm=true"], qk_norm_on)):
            proc = sh(["dvc", "exp", "run", "--queue", *args], recorded_repo)
            name = re.search(r"Queued experiment '([^']+)'", proc.stdout + proc.stderr)
            assert name, proc.stdout + proc.stderr
            wanted[name.group(1)] = expected
        queued = queued_params(recorded_repo)
        assert set(queued) == set(wanted), (sorted(queued), sorted(wanted))
        for name, expected in wanted.items():
            diff = {k: (queued[name].get(k), v) for k, v in expected.items() if queued[name].get(k) != v}
            assert not diff, (name, diff)
            assert set(queued[name]) == set(expected), (name, set(queued[name]) ^ set(expected))
    finally:
        sh(["dvc", "queue", "remove", "--all"], recorded_repo)
        sh(["git", "checkout", "--", "params.yaml"], recorded_repo)


def test_editing_the_dit_reruns_only_dit_stages(recorded_repo):
    dit = recorded_repo / "aligntok/models/dit.py"
    original = dit.read_text()
    dit.write_text(original + "\n# edited\n")
    try:
        status = sh(["dvc", "status", "--json"], recorded_repo).stdout
    finally:
        dit.write_text(original)
    assert set(json.loads(status)) == {"train-dit", "evaluate"}, status


def test_python_m_aligntok_and_version():
    from aligntok import __version__
    proc = sh([sys.executable, "-m", "aligntok", "--version"], ROOT)
    assert proc.stdout.strip() == f"aligntok {__version__}"


@pytest.mark.slow
def test_two_experiments_compare_with_numbers(tmp_path):
    """Two `dvc exp run` variants on the ci profile: DVC shows both with numbers (no `!`: the metrics reached the
    experiment commits), compactly with --only-changed, and diffs their metrics."""
    repo = copy_repo(tmp_path / "aligntok")
    env = isolated_env(tmp_path)
    sh([sys.executable, "-m", "aligntok", "profile", "ci"], repo, env)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "ci profile"], repo)
    for name, weight in (("sp-on", 1), ("sp-off", 0)):
        sh(["dvc", "exp", "run", "-n", name, "-S", f"tokenizer.stage2.semantic_weight={weight}"], repo, env)
    table = sh(["dvc", "exp", "show", "--md", "--only-changed"], repo, env).stdout
    rows = [line for line in table.splitlines() if "sp-on" in line or "sp-off" in line]
    assert len(rows) == 2 and "!" not in "".join(rows), table
    header = table.splitlines()[0]
    assert not any(s in header for s in ("content_hash", "fid_backbone", "lpips_backbone", "device")), header
    diff = json.loads(sh(["dvc", "metrics", "diff", "sp-on", "sp-off", "--json"], repo, env).stdout)
    evaluate = diff["outputs/metrics/evaluate.json"]
    assert all(isinstance(v["old"], (int, float)) and isinstance(v["new"], (int, float)) for v in evaluate.values())
    assert "rfid" in evaluate or "gfid" in evaluate, evaluate
