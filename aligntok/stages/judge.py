"""`aligntok judge`: train the independent judge classifier (aligntok/eval/judge.py) into outputs/judge/.

With `judge.source: none` the stage writes only a config saying so, and evaluate reports no judge metrics.
"""
from __future__ import annotations

from aligntok.config import Params
from aligntok.stages.common import JUDGE_DIR, write_metrics
from aligntok.tracking import stage_run


def run(params: Params, args) -> int:
    from aligntok.eval.judge import CONFIG_FILE, save_judge, train_judge
    from aligntok.io import write_json_atomic

    j, d = params.judge, params.data
    with stage_run(params, "judge") as tracker:
        if j.source == "none":
            write_json_atomic(JUDGE_DIR / CONFIG_FILE, {"enabled": False, "reason": "judge.source: none"})
            write_metrics("judge", {"enabled": 0}, tracker)
            print("judge: off (judge.source: none)")
            return 0
        if params.task == "text":  # scenes: one head per caption attribute
            from aligntok.eval.caption_judge import save_caption_judge, train_caption_judge
            judge, facts = train_caption_judge(d.resolution, params.seed, j.train_images, j.test_images, j.steps,
                                               j.batch_size, j.lr)
            save_caption_judge(judge, JUDGE_DIR, {"enabled": True, **facts})
            write_metrics("judge", {"enabled": 1, **facts, "data": "held-out scenes"}, tracker)
            print(f"judge: held-out caption accuracy {facts['heldout_caption_acc']:.3f} "
                  f"(chance {facts['chance_caption_acc']:.4f})")
            return 0
        judge, facts = train_judge(d.num_classes, d.resolution, params.seed, j.train_images, j.test_images,
                                   j.steps, j.batch_size, j.lr)
        reference = facts.pop("reference")
        save_judge(judge, reference, JUDGE_DIR, {"enabled": True, **facts})
        write_metrics("judge", {"enabled": 1, **facts, "data": "held-out synthetic"}, tracker)
    print(f"judge: held-out accuracy {facts['heldout_accuracy']:.3f} (chance {facts['chance']:.3f})")
    return 0
