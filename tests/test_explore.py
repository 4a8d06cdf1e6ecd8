"""The explore stage (explore.py) on small generated archives."""

import json
from pathlib import Path

import numpy as np
import pytest

from support import setup_project
from resnet_cifar import explore


@pytest.mark.parametrize("fmt", ["cifar-10-binary", "cifar-100-python"])
def test_explore_writes_figures_and_numbers(tmp_path, monkeypatch, fmt):
    archive = setup_project(tmp_path, monkeypatch, fmt)
    explore.main([])
    summary = json.loads(Path("metrics/explore.json").read_text())
    assert summary["images"] == {"train": 50, "test": 10}
    assert summary["classes"] == len(archive.classes)
    train_counts = np.bincount(archive.y_train, minlength=len(archive.classes))
    assert summary["class_count_min"]["train"] == train_counts.min()
    assert summary["class_count_max"]["train"] == train_counts.max()
    assert summary["pixel_min"] == archive.x_train.min() and summary["pixel_max"] == archive.x_train.max()
    red = archive.x_train[..., 0] / 255
    assert summary["channel_mean"]["red"] == pytest.approx(red.mean(), abs=1e-4)
    assert summary["channel_std"]["red"] == pytest.approx(red.std(), abs=1e-4)
    for name in ("first_16_images", "examples_per_class", "class_counts", "pixel_histograms"):
        assert Path(f"metrics/explore/{name}.png").stat().st_size > 5000
