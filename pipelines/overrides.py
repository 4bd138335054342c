"""The run form's free `overrides` (`dotted.key=value`) as a JSON schema, so the Prefect server refuses a bad one
when the run is created (HTTP 409, like the form's other fields) instead of a run failing later.

Prefect checks a run's parameters against the deployment's JSON schema only, and a schema cannot parse a number
out of a string, so each known key gets a pattern for its value built from the params model: its type, choices,
null when optional, and the bounds every numeric param uses (> 0, >= 0, >= 1, 0..1). Other bounds and checks
across params are still made by `load_params` when the run starts, before any stage or worktree.
"""
import re
from pathlib import Path
from typing import Any

import yaml

from aligntok.config import Params, get_dotted

PROFILES = Path(__file__).resolve().parents[1] / "profiles"

NUMBER = r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?"
NULL = r"null|Null|NULL|~"
BOOL = r"true|True|TRUE|false|False|FALSE"
# (lower bound, exclusive?, upper bound) -> YAML numbers in that range, and integers in it (no sign: none < 0)
BOUNDED = {
    (0, True, None): (r"\+?(\d*[1-9]\d*\.?\d*|\d*\.\d*[1-9]\d*)([eE][+-]?\d+)?", r"\+?0*[1-9]\d*"),
    (0, False, None): (r"\+?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", r"\+?\d+"),
    (1, False, None): (r"\+?0*[1-9]\d*\.?\d*([eE]\+?\d+)?", r"\+?0*[1-9]\d*"),
    (0, False, 1): (r"\+?(0*(\.\d*)?|0*1(\.0*)?|\d?\.?\d+[eE]-\d+)", r"\+?0*[01]"),
}


def _resolve(node: dict, defs: dict) -> dict:
    ref = node.get("$ref")
    return _resolve(defs[ref.rsplit("/", 1)[1]], defs) if ref else node


def _value_pattern(node: dict, defs: dict) -> str:
    node = _resolve(node, defs)
    if "anyOf" in node:
        return "|".join(f"(?:{_value_pattern(alt, defs)})" for alt in node["anyOf"])
    if "enum" in node or "const" in node:
        return "|".join(re.escape(str(v)) for v in node.get("enum", [node.get("const")]))
    kind = node.get("type")
    if kind == "null":
        return NULL
    if kind == "boolean":
        return BOOL
    if kind in ("integer", "number"):
        low = node.get("exclusiveMinimum", node.get("minimum"))
        bounds = (low, "exclusiveMinimum" in node, node.get("maximum", node.get("exclusiveMaximum")))
        number, integer = BOUNDED.get(bounds, (NUMBER, r"[+-]?\d+"))
        return integer if kind == "integer" else number
    return r".*"  # strings, lists: anything; load_params checks them when the run starts


def _leaves(node: dict, defs: dict, prefix: str = "") -> dict[str, dict]:
    """{dotted key: its schema} for every param below `node` (sections are walked, not offered as keys)."""
    out = {}
    for name, prop in _resolve(node, defs).get("properties", {}).items():
        sub = _resolve(prop, defs)
        if sub.get("type") == "object" and "properties" in sub:
            out.update(_leaves(sub, defs, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = prop
    return out


def overrides_schema() -> dict[str, Any]:
    """The JSON schema of one `dotted.key=value` entry: a known key, then a value that key accepts. A bad value is
    reported with the pattern of its key (`'dit.steps=-1' does not match '^dit\\.steps=(?:\\+?0*[1-9]\\d*)$'`)."""
    schema = Params.model_json_schema()
    defs = schema.get("$defs", {})
    leaves = sorted(_leaves(schema, defs).items())
    return {"type": "string",
            "anyOf": [{"pattern": f"^{re.escape(key)}="} for key, _ in leaves],
            "allOf": [{"if": {"pattern": f"^{re.escape(key)}="},
                       "then": {"pattern": f"^{re.escape(key)}=(?:{_value_pattern(node, defs)})$"}}
                      for key, node in leaves]}


def profile_values(key: str, profiles: tuple[str, ...]) -> str:
    """`smoke: 100, ci: 20`: what `key` is in each profile, which a run form field left empty keeps."""
    defaults = Params().model_dump(mode="json")
    values = []
    for name in profiles:
        tree = yaml.safe_load((PROFILES / f"{name}.yaml").read_text()) or {}
        try:
            value = get_dotted(tree, key)
        except (KeyError, TypeError):  # not in the profile file: the params model's default
            value = get_dotted(defaults, key)
        values.append(f"{name}: {value}")
    return ", ".join(values)
