"""The prepare stage (prepare.py) on every archive format."""

import numpy as np
import pytest

from cifar_archives import FORMATS
from support import setup_project
from resnet_cifar import datasets, prepare


@pytest.mark.parametrize("fmt, label_mode", [(fmt, "fine") for fmt in FORMATS] + [("cifar-100-binary", "coarse")])
def test_prepare_scales_pixels_and_one_hot_encodes(tmp_path, monkeypatch, capsys, fmt, label_mode):
    archive = setup_project(tmp_path, monkeypatch, fmt, label_mode)
    prepare.main([])
    prepared = datasets.load_prepared()
    coarse = label_mode == "coarse"
    for split in ("train", "test"):
        x, y = prepared[f"x_{split}"], prepared[f"y_{split}"]
        assert x.dtype == np.float32 and y.dtype == np.float32
        np.testing.assert_array_equal(x, getattr(archive, f"x_{split}").astype("float32") / 255)
        labels = getattr(archive, f"y_{split}_coarse" if coarse else f"y_{split}")
        assert y.shape == (len(labels), 20 if coarse else 100 if "100" in fmt else 10)
        np.testing.assert_array_equal(y.sum(axis=1), 1)
        np.testing.assert_array_equal(y.argmax(axis=1), labels)
    assert prepared["classes"] == (archive.coarse_classes if coarse else archive.classes)
    printed = capsys.readouterr().out
    assert "x_train: (50, 32, 32, 3) float32, min 0.0, max 1.0" in printed
    assert f"y_test: (10, {y.shape[1]}) one-hot" in printed
