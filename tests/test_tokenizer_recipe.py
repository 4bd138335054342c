"""Issue 22's recipe items, each against a value worked out by hand or read from the reference code: gradient
clipping and the fraction of steps it fired, LightningDiT's log-normal -> uniform switch, the tokenizer
optimisers (VA-VAE's Adam), the discriminator carried from stage to stage, the semantic-preservation gradient
ratio, and the layering of the fingerprints (no module below stages/ imports stages/)."""
import ast

from tests.conftest import ROOT

# Consumers of the stages: the CLI dispatches to them and the benchmarks time their recipes.
STAGE_USERS = ("aligntok/cli.py", "aligntok/stages/", "aligntok/bench/")


def test_no_module_below_the_stages_imports_them():
    """eval/reference.py and generate.py took file_hash / tokenizer_hash from stages/; the fingerprints now live
    in aligntok/fingerprint.py, and nothing under the stages reaches up into them."""
    upward = []
    for f in sorted((ROOT / "aligntok").rglob("*.py")):
        rel = str(f.relative_to(ROOT))
        if rel.startswith(STAGE_USERS):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            upward += [f"{rel}: {n}" for n in names if n == "aligntok.stages" or n.startswith("aligntok.stages.")]
    assert not upward, upward


def test_fingerprints_are_sha256_prefixes(tmp_path):
    import hashlib
    from aligntok.fingerprint import file_hash, tokenizer_hash
    blob = bytes(range(256)) * 9000  # > 2 MiB: the chunked read crosses chunk boundaries
    (tmp_path / "model.safetensors").write_bytes(blob)
    assert file_hash(tmp_path / "model.safetensors") == hashlib.sha256(blob).hexdigest()[:16]
    assert tokenizer_hash(tmp_path) == file_hash(tmp_path / "model.safetensors")
