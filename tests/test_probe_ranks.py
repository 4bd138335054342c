"""The linear probe over ranks: each rank encodes a contiguous run of whole batches of the picked train images and
of the val split, so the latents gathered in rank order are those of one rank, bit for bit, and 2 gloo ranks fit the
same probe and score the same accuracy as one process."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.test_user_paths import clean_env


def _tokenizer():
    """The ci profile's tokenizer, random init: a real conv encoder, whose float arithmetic depends on the batch."""
    from aligntok.config import load_params
    from aligntok.models.tokenizer import AlignTokenizer
    from aligntok.stages.tokenizer import tokenizer_config

    torch.manual_seed(0)
    return AlignTokenizer(tokenizer_config(load_params(ROOT / "profiles" / "ci.yaml"))).eval()


def _split(n: int, num_classes: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """n 32 x 32 images in [-1, 1], the class as a brighter square at a class-specific place."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g) * 1.2 - 1
    for i in range(n):
        c = i % num_classes
        x[i, :, 4 * c:4 * c + 8, 8:16] += 0.8
    return list(zip(x.clamp(-1, 1), (torch.arange(n) % num_classes).tolist()))


def test_rank_latents_concatenated_in_rank_order_are_the_one_rank_latents(one_thread):
    from aligntok.eval.coord import Coord
    from aligntok.eval.probe import rank_latents, stratified

    tokenizer, data = _tokenizer(), _split(61, 5, 0)
    picked = stratified([y for _, y in data], 5, per_class=9, seed=0)  # 45 scattered indices: 6 batches of 8
    cpu = torch.device("cpu")
    for indices in (picked, range(len(data))):
        z1, y1 = rank_latents(tokenizer, data, indices, cpu, Coord(), batch_size=8)
        assert z1.shape[0] == len(indices) and y1.tolist() == [data[i][1] for i in indices]
        for world in (2, 3, 7):  # 7 ranks for 6 or 8 batches: some rank may hold none
            parts = [rank_latents(tokenizer, data, indices, cpu, Coord(r, world), batch_size=8) for r in range(world)]
            z, y = (torch.cat([p[k] for p in parts if len(p[1])]) for k in (0, 1))
            # same batches, same one-thread arithmetic: equal bit for bit; one image lost, doubled or encoded in
            # another batch would show as a row that differs
            assert torch.equal(z, z1) and torch.equal(y, y1), world


DRIVER = """
import json, sys
import torch
from aligntok.eval.coord import Coord
from aligntok.eval.probe import linear_probe
from aligntok.train.dist import cleanup, init_distributed
from tests.test_probe_ranks import _split, _tokenizer

torch.set_num_threads(1)
dist = init_distributed("cpu")
out = linear_probe(_tokenizer(), _split(70, 5, 0), _split(43, 5, 1), 5, dist.device, per_class=11,
                   coord=Coord(dist.rank, dist.world_size), batch_size=8, num_workers=int(sys.argv[2]))
assert (out is None) == (dist.rank != 0), (dist.rank, out)
if out is not None:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
cleanup()
"""


@pytest.mark.slow
def test_two_gloo_ranks_score_the_one_process_probe(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    runs = {"one": [sys.executable, str(script), str(tmp_path / "one.json"), "0"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                    str(tmp_path / "two.json"), "1"]}  # one loader worker per rank
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in runs)
    assert (one["probe_train_images"], one["probe_val_images"]) == (55, 43)
    # a count over 43 images: the same latents in the same batches give the same fit and the same predictions; one
    # prediction that differs moves the accuracy by 1/43
    assert one == two
    assert 0.2 < one["linear_probe_acc"] <= 1  # not degenerate: above chance (0.2) with the class in the images
