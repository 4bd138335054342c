"""The independent judge: trained on held-out synthetic images, it labels other held-out real images far above
chance, its FD separates real images from broken ones, and it round-trips through its saved folder."""
import numpy as np
import pytest
import torch

from aligntok.eval.judge import judge_metrics, load_judge, judge_seed, save_judge, synthetic_batch, train_judge
from tests.conftest import single_thread

CLASSES, RES = 10, 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A judge trained on one torch thread; the tests that use it also run on one (the thread count is the
    caller's again after this module)."""
    with single_thread():
        judge, facts = train_judge(CLASSES, RES, seed=0, train_images=600, test_images=200, steps=150, batch_size=64,
                                   lr=2e-3)
        folder = tmp_path_factory.mktemp("judge")
        save_judge(judge, facts.pop("reference"), folder, {"enabled": True, **facts})
        yield judge, facts, folder


def test_heldout_accuracy_is_far_above_chance(trained):
    _, facts, _ = trained
    # chance is 0.10; a judge that learned nothing lands near it. 0.6 leaves room for CPU-kernel differences
    # in 150 steps of training while still failing any judge that cannot tell the classes apart.
    assert facts["heldout_accuracy"] >= 0.6, facts


def test_judge_images_are_not_the_pipelines_images():
    from aligntok.data.synthetic import synthetic_image
    ours, _ = synthetic_batch([0], CLASSES, RES, seed=0)
    prepared = np.asarray(synthetic_image(0, 0, RES, seed=0))  # what `prepare` draws for image 0 with seed 0
    assert judge_seed(0) != 0
    assert not np.array_equal(ours[0].permute(1, 2, 0).numpy(), prepared)


def test_metrics_on_fresh_real_images_and_on_noise(trained):
    _, _, folder = trained
    images, labels = synthetic_batch(range(5000, 5200), CLASSES, RES, seed=0)  # neither train nor test images
    real = judge_metrics(load_judge(folder), images, labels.numpy())
    noise = judge_metrics(load_judge(folder), torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                          labels.numpy())
    assert real["class_acc_judge"] >= 0.6, real
    assert noise["class_acc_judge"] <= 0.35, noise  # noise carries no class: near chance (0.10)
    # 200 real images vs the judge's own 200 held-out ones: only sampling error; noise is far off the manifold
    assert noise["fd_judge"] > 5 * real["fd_judge"], (real, noise)
    # precision/recall in the judge's space: fresh real images lie on the held-out manifold, noise nowhere near it
    assert real["precision_judge"] >= 0.5 and real["recall_judge"] >= 0.5, real
    assert noise["precision_judge"] <= 0.1, noise
    assert set(judge_metrics(load_judge(folder), images, None)) == {"fd_judge", "precision_judge", "recall_judge"}  # unconditional samples: no accuracy


def test_a_judge_switched_off_gives_no_metrics(tmp_path):
    from aligntok.eval.judge import CONFIG_FILE
    (tmp_path / CONFIG_FILE).write_text('{"enabled": false}')
    assert judge_metrics(load_judge(tmp_path), torch.zeros(2, 3, RES, RES, dtype=torch.uint8), np.zeros(2)) == {}
