"""LightningDiT's own model code (hustvl/LightningDiT, models/lightningdit.py and the modules it imports), loaded
from a checkout outside this repository: the yardstick for `aligntok bench dit` and for the equivalence tests of
aligntok.models.dit. Nothing of it is kept here; this module only finds the checkout, imports it and maps our
parameter names onto its.

The checkout is located by `root=` or else the environment variable LIGHTNINGDIT_ROOT (the directory that holds
models/lightningdit.py). Its modules import each other as `models.<name>`, so the import runs with the checkout
at the front of sys.path and under the top-level name `models`; afterwards sys.path and sys.modules are put back
as they were (any `models` module of the caller's included), and the loaded modules live on only through the
objects returned here. The model code runs unchanged, its `@torch.compile` decorators included: that compiled
model is what "the reference" means in the benchmark, and `torch.compiler.set_stance("force_eager")` runs the same
code eagerly.

models/rmsnorm.py imports fairscale's model-parallel layers at module level for Llama code that the DiT never
uses (the DiT takes only its RMSNorm). When fairscale is not installed, a placeholder `fairscale` package whose
names raise on use is put in sys.modules for the duration of that import only. models/pos_embed.py needs einops
(in the dev extra)."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch.nn as nn

ENV = "LIGHTNINGDIT_ROOT"
HOW = (f"git clone https://github.com/hustvl/LightningDiT somewhere outside this project and set {ENV} to that "
       "checkout to compare against LightningDiT's model code")
_PROJECT = Path(__file__).resolve().parents[2]
_UPSTREAM_PACKAGE = "models"
# fairscale names models/rmsnorm.py imports (for its unused Llama layers)
_FAIRSCALE = {"fairscale.nn.model_parallel.initialize": (),
              "fairscale.nn.model_parallel.layers": ("ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear")}

SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12)}


class ReferenceUnavailable(RuntimeError):
    """LightningDiT's model code could not be found or imported; the message says how to get it (one line)."""


def _root(root: str | os.PathLike | None) -> Path:
    given = root if root is not None else os.environ.get(ENV)
    if not given:
        raise ReferenceUnavailable(f"{ENV} is not set: {HOW}")
    path = Path(given).expanduser().resolve()
    if path == _PROJECT or _PROJECT in path.parents:
        raise ReferenceUnavailable(f"{ENV}={given} is inside this project; peer code stays outside it: {HOW}")
    if not (path / _UPSTREAM_PACKAGE / "lightningdit.py").is_file():
        raise ReferenceUnavailable(f"{ENV}={given} has no {_UPSTREAM_PACKAGE}/lightningdit.py: {HOW}")
    return path


def _placeholder_fairscale() -> dict[str, types.ModuleType]:
    """Stand-ins for the fairscale modules models/rmsnorm.py imports but the DiT never uses: every name raises when
    called, so any use would fail loudly instead of computing something else."""
    def unavailable(name):
        def fail(*args, **kwargs):
            raise RuntimeError(f"fairscale.{name} is a placeholder (aligntok.bench.reference): fairscale is not "
                               "installed and LightningDiT's DiT does not use it")
        return type(name, (), {"__init__": fail})

    mods = {}
    for full, names in _FAIRSCALE.items():
        parts = full.split(".")
        for i in range(1, len(parts) + 1):
            mods.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        for name in names:
            setattr(mods[full], name, unavailable(name))
    for name, mod in mods.items():  # parent.child attributes, as a real import would set them
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
        mod.__path__ = []  # a package, so the submodules resolve
    return mods


@functools.lru_cache(maxsize=None)
def _import(root: Path) -> types.SimpleNamespace:
    def ours(name):
        return name == _UPSTREAM_PACKAGE or name.startswith(_UPSTREAM_PACKAGE + ".")

    saved_modules = {n: sys.modules.pop(n) for n in [n for n in sys.modules if ours(n)]}
    saved_path = list(sys.path)
    placeholders = {} if importlib.util.find_spec("fairscale") is not None else _placeholder_fairscale()
    placeholders = {n: m for n, m in placeholders.items() if n not in sys.modules}
    try:
        sys.modules.update(placeholders)
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()
        lightningdit = importlib.import_module(f"{_UPSTREAM_PACKAGE}.lightningdit")
        pos_embed = importlib.import_module(f"{_UPSTREAM_PACKAGE}.pos_embed")
    except Exception as e:
        raise ReferenceUnavailable(f"LightningDiT's model code at {root} did not import "
                                   f"({type(e).__name__}: {e}); pip install -e '.[dev]' provides einops") from e
    finally:
        sys.path[:] = saved_path
        for n in [n for n in sys.modules if ours(n)]:
            del sys.modules[n]
        sys.modules.update(saved_modules)
        for n, m in placeholders.items():
            if sys.modules.get(n) is m:
                del sys.modules[n]
    return types.SimpleNamespace(root=root, lightningdit=lightningdit, pos_embed=pos_embed)


def load(root: str | os.PathLike | None = None) -> types.SimpleNamespace:
    """The upstream modules (`.lightningdit`, `.pos_embed`) and the checkout's `.root`; imported once per checkout.
    Raises ReferenceUnavailable with a one-line message when the checkout is missing, wrong or does not import."""
    return _import(_root(root))


def unavailable_reason(root: str | os.PathLike | None = None) -> str | None:
    """None when the reference loads, else the one-line reason (which says how to get it)."""
    try:
        load(root)
    except ReferenceUnavailable as e:
        return str(e)
    return None


def build_reference(name: str, input_size: int, in_channels: int, num_classes: int, root=None, **overrides):
    """The reference with the paper config's switches (SwiGLU, RMSNorm, RoPE, no QK-norm, shift kept), for the same
    registry names as aligntok.models.dit ("tiny": 4 blocks, hidden 128, 4 heads, patch 1)."""
    if name == "tiny":
        depth, hidden, heads, patch = 4, 128, 4, 1
    else:
        size, patch = name.removeprefix("LightningDiT-").split("/")
        (depth, hidden, heads), patch = SIZES[size], int(patch)
    kw = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, use_qknorm=False, use_swiglu=True,
              use_rope=True, use_rmsnorm=True, wo_shift=False)
    kw.update(overrides)
    return load(root).lightningdit.LightningDiT(input_size=input_size, in_channels=in_channels,
                                                num_classes=num_classes, **kw)


def vision_rope(dim: int, pt_seq_len: int, root=None) -> nn.Module:
    """The reference's RoPE module (VisionRotaryEmbeddingFast) as its DiT builds it: `dim` = head size / 2."""
    return load(root).pos_embed.VisionRotaryEmbeddingFast(dim=dim, pt_seq_len=pt_seq_len)


def reference_key(key: str) -> str:
    """An aligntok LightningDiT state_dict / parameter name -> the reference's name for the same tensor."""
    key = (key.replace("x_embedder.", "x_embedder.proj.").replace("t_embedder.", "t_embedder.mlp.")
           .replace("y_embedder.weight", "y_embedder.embedding_table.weight"))
    key = {"norm_final.weight": "final_layer.norm_final.weight"}.get(key, key)
    return key.replace("final_modulation.", "final_layer.adaLN_modulation.").replace("final_linear.", "final_layer.linear.")


def load_ours_into_reference(ours: nn.Module, ref: nn.Module) -> None:
    """Copy an aligntok LightningDiT's weights into the reference (the null-class row included when it has one)."""
    sd = {reference_key(k): v for k, v in ours.state_dict().items()}
    table = ref.y_embedder.embedding_table.weight
    sd["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"][: table.shape[0]]
    sd["pos_embed"] = ref.pos_embed.detach().clone()  # the reference's own frozen table (ours is a buffer)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("feat_rope.")]  # its RoPE tables are built, not trained
    if missing or unexpected:
        raise KeyError(f"reference weight mapping: missing {missing}, unexpected {unexpected}")
