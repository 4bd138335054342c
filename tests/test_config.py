import json
import os
import shutil
import re
import subprocess
import sys

import pytest
import yaml

from aligntok.config import ConfigError, Params, flatten, load_params
from tests.conftest import ROOT, SMOKE


def write(tmp_path, tree):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def git_show(path: str) -> str | None:
    """`path` as committed at HEAD, or None outside a git checkout."""
    proc = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def test_shipped_params_are_the_smoke_profile():
    """The one test about the root params.yaml itself (every other test loads a committed profile): as committed
    it is a copy of profiles/smoke.yaml."""
    assert load_params(SMOKE).profile == "smoke"
    # The live params.yaml is the user's to switch (`aligntok profile ci`), so what must be the smoke profile is
    # the committed one; a live params.yaml that says it is smoke must still be that file, not a drifted copy.
    shipped = git_show("params.yaml")
    if shipped is None:
        pytest.skip("not a git checkout: the shipped params.yaml cannot be told from a switched one")
    assert shipped == git_show("profiles/smoke.yaml")
    live = ROOT / "params.yaml"
    if yaml.safe_load(live.read_text()).get("profile") == "smoke":
        assert live.read_text() == SMOKE.read_text()


@pytest.mark.parametrize("profile", ["smoke", "ci", "imagenet256"])
def test_every_profile_validates(profile):
    params = load_params(ROOT / "profiles" / f"{profile}.yaml", check_paths=False)
    assert params.profile == profile


@pytest.mark.parametrize("override, expected", [
    ("tokenizer.stage2.lr=-1", "tokenizer.stage2.lr: given -1; expected input should be greater than 0"),
    ("tokenizer.stage2.bogus=1", "tokenizer.stage2.bogus: unknown key"),
    ("data.resolution=abc", "data.resolution: given 'abc'; expected input should be a valid integer"),
    ("data.val_fraction=1.5", "data.val_fraction: given 1.5; expected input should be less than or equal to 1"),
    ("sample.method=ddim", "sample.method: given 'ddim'; expected input should be 'euler' or 'heun'"),
    ("nokey", "-S 'nokey': expected dotted.key=value"),
    ("dit.lr=.inf", "dit.lr: given inf; expected input should be a finite number"),  # YAML's infinity, a typo here
    ("tokenizer.stage1.l1_weight=.nan", "tokenizer.stage1.l1_weight: given nan; expected input should be a finite"),
])
def test_bad_override_names_key_value_and_expectation(override, expected):
    with pytest.raises(ConfigError) as err:
        load_params(SMOKE, [override])
    assert str(err.value).startswith(expected)
    assert "\n" not in str(err.value)


def test_missing_path_is_reported(tmp_path):
    p = write(tmp_path, {"data": {"source": "imagefolder", "root": "no/such/dir"}})
    with pytest.raises(ConfigError, match=r"^data.root: given 'no/such/dir'; expected an existing path"):
        load_params(p)


def test_source_without_root_is_reported(tmp_path):
    p = write(tmp_path, {"data": {"source": "parquet"}})
    with pytest.raises(ConfigError, match="data.root is required when data.source is 'parquet'"):
        load_params(p)


def test_overrides_are_typed_like_yaml():
    params = load_params(SMOKE, ["tokenizer.stage2.semantic_weight=0", "sample.cfg_channels=3",
                                                "dit.ema_decay=null"])
    assert params.tokenizer.stage2.semantic_weight == 0.0
    assert params.sample.cfg_channels == 3
    assert params.dit.ema_decay is None


def test_flatten_gives_dotted_keys():
    flat = flatten(Params().model_dump(mode="json"))
    assert flat["tokenizer.stage2.lr"] == Params().tokenizer.stage2.lr
    assert "tokenizer.stage2" not in flat


def test_result_hash_changes_only_with_what_changes_results():
    a = load_params(SMOKE)
    b = load_params(SMOKE, ["tokenizer.stage3.lr=0.5"])
    assert a.result_hash("tokenizer.stage1") == b.result_hash("tokenizer.stage1")
    assert a.result_hash("tokenizer.stage3") != b.result_hash("tokenizer.stage3")
    # how a run is carried out (workers, logging and checkpoint intervals) must not restart a resumable stage
    c = load_params(SMOKE, ["data.num_workers=3", "tokenizer.stage1.log_every=7",
                                           "tokenizer.stage1.ckpt_every=9", "dit.image_every=11"])
    for keys in [("tokenizer.stage1", "encoder", "lpips", "data"), ("dit",)]:
        assert a.result_hash(*keys) == c.result_hash(*keys)
    assert a.result_hash("data") != load_params(SMOKE, ["data.hflip=false"]).result_hash("data")


def test_cli_config_error_exit_code_2_and_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aligntok.cli", "prepare", "--params", str(SMOKE),
                           "-S", "data.num_images=-3"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["aligntok: config error: data.num_images: given -3; expected input should be greater than 0"]


def test_cli_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "aligntok.cli", "--help"], capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="80"), check=True).stdout
    # argparse lists one subcommand per line, indented 4 spaces under "<command>" (help text wraps at 20):
    # a substring test would find "sample" in evaluate's help ("...of samples...")
    listed = out.split("\n  <command>\n", 1)[1].split("\n\n", 1)[0]
    commands = re.findall(r"^    (\S+)", listed, flags=re.M)
    expected = ["prepare", "tokenizer-stage1", "tokenizer-stage2", "tokenizer-stage3", "cache-latents",
                "train-dit", "evaluate", "sample", "bench", "compare", "profile", "repro"]
    assert len(commands) == len(set(commands)) and set(expected) <= set(commands), commands


def test_profile_switch_copies_and_refuses_unknown(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "ci.yaml").write_text((ROOT / "profiles" / "ci.yaml").read_text())
    run = lambda *a: subprocess.run([sys.executable, "-m", "aligntok.cli", "profile", *a],
                                    capture_output=True, text=True, cwd=tmp_path)
    assert run("ci").returncode == 0
    assert (tmp_path / "params.yaml").read_text() == (tmp_path / "profiles" / "ci.yaml").read_text()
    bad = run("nope")
    assert bad.returncode == 2 and "profile 'nope' not found in profiles/ (available: ci)" in bad.stderr


def test_paper_profile_refuses_random_lpips_backbone():
    with pytest.raises(ConfigError, match="lpips.pretrained_backbone: given False; expected true in the imagenet256"):
        load_params(ROOT / "profiles" / "imagenet256.yaml", ["lpips.pretrained_backbone=false"], check_paths=False)


def test_cli_prepare_takes_the_val_split_from_data_val_root(tmp_path):
    from PIL import Image
    for split, classes in (("train", "ab"), ("val", "ab")):
        for c in classes:
            for k in range(2 if split == "val" else 5):
                (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20, 20), (k * 40, 0, 0)).save(tmp_path / split / c / f"{k}.png")
    shutil.copy(SMOKE, tmp_path / "params.yaml")  # relative paths are read from the params file's folder
    args = [sys.executable, "-m", "aligntok.cli", "prepare", "-S", "data.source=imagefolder",
            "-S", "data.root=train", "-S", "data.val_fraction=0", "-S", "data.name=folder", "-S", "data.resolution=16"]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    missing = subprocess.run(args + ["-S", "data.val_root=nope"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == ("aligntok: config error: data.val_root: given 'nope'; expected an "
                                                       "existing path (not found)")
    subprocess.run(args + ["-S", "data.val_root=val"], capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    manifest = json.loads((tmp_path / "data/folder/manifest.json").read_text())
    assert manifest["val_root"] == "val" and manifest["num_images"] == {"train": 10, "val": 4}
