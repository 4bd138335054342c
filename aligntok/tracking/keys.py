"""The MLflow keys of a stage's final numbers; its metrics file (outputs/metrics/<stage>.json, a DVC metric) keeps
the plain names.

A tokenizer stage measures its model on the val split after training. Under the file's names its `lpips` would land
on the training curve `lpips` as one more point at the last step, a val number on a train curve, so MLflow gets
every number of those stages' final record as `val_<name>` (`val_steps`: the step the measured model reached). The
stage's run (`aligntok.stages.common.write_metrics`) and a run restored from DVC's cache must use this same rule.
"""
from __future__ import annotations

VAL_PREFIX = "val_"
VAL_STAGES = ("tokenizer-stage1", "tokenizer-stage2", "tokenizer-stage3")


def final_metric_keys(stage: str, numbers: dict[str, float]) -> dict[str, float]:
    """`numbers` (a stage's final record) under the keys MLflow gets them."""
    prefix = VAL_PREFIX if stage in VAL_STAGES else ""
    return {prefix + k: v for k, v in numbers.items()}
