"""The evaluate stage (evaluate.py): metrics, test-time augmentation, and an interrupted evaluation."""

import numpy as np
import pytest

from support import built, setup_project
from resnet_cifar import evaluate, paths, prepare, train, tta


def test_top_k_and_per_class_accuracy():
    probabilities = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    true_ids = np.array([1, 2, 2])
    assert evaluate.top_k_accuracy(true_ids, probabilities, 1) == pytest.approx(1 / 3)
    assert evaluate.top_k_accuracy(true_ids, probabilities, 2) == pytest.approx(2 / 3)
    per_class = evaluate.per_class_accuracy(true_ids, probabilities.argmax(axis=1), ["a", "b", "c"])
    assert per_class == {"a": None, "b": 0.0, "c": 0.5}


def test_ctrl_c_during_evaluation_leaves_no_output(tmp_path, monkeypatch):
    setup_project(tmp_path, monkeypatch, "cifar-10-binary")
    prepare.main([])
    train.main(["small"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "write_confusion", interrupted)  # after evaluate.json is written
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(["small"])
    assert not paths.evaluate_path("small").exists()
    assert not paths.confusion_path("small").exists()


def test_shifted_test_time_augmentation_averages_six_views():
    model = built([8], 3, input_shape=(4, 4, 3))
    x = np.random.default_rng(1).uniform(size=(5, 4, 4, 3)).astype(np.float32)
    rows = np.array([1, 0, 1, 2])  # mirror-padded by one pixel: row -1 is row 1, row 4 is row 2
    down_right = x[:, rows][:, :, rows]  # the image moved one pixel down and right
    up_left = x[:, [1, 2, 3, 2]][:, :, [1, 2, 3, 2]]  # and one pixel up and left
    views = [tta.predict(model, view, tta=True) for view in (x, down_right, up_left)]
    expected = views[0] / 2 + (views[1] + views[2]) / 4
    np.testing.assert_allclose(tta.predict(model, x, tta="shifts"), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(expected, views[0])


def test_test_time_augmentation_averages_the_image_and_its_mirror():
    model = built([8], 3, input_shape=(4, 4, 3))
    x = np.random.default_rng(0).uniform(size=(5, 4, 4, 3)).astype(np.float32)
    plain, averaged = tta.predict(model, x, tta=False), tta.predict(model, x, tta=True)
    # Averaged over both views, a prediction no longer depends on which of the two it was given.
    np.testing.assert_allclose(tta.predict(model, x[:, :, ::-1], tta=True), averaged, rtol=1e-5, atol=1e-7)
    assert not np.allclose(plain, averaged)  # a dense network is not mirror-symmetric
    np.testing.assert_allclose(averaged.sum(axis=1), 1, rtol=1e-5)  # still probabilities
