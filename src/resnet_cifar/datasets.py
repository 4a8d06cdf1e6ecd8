"""The arrays the data stages write, as every later stage and tool reads them: the download
stage's raw arrays and the prepare stage's normalized ones. Not a stage itself, so that a stage
that reads them reruns when these readers change, not when a stage's own code does.
"""

import json
import zipfile
from pathlib import Path

import numpy as np

from resnet_cifar.paths import PREPARED_DIR
from resnet_cifar.stage import StageError

SPLITS = ("train", "test")


class DataError(StageError):
    """A missing, unreachable, corrupt or unexpected CIFAR archive or raw data file."""


def load_raw(path: Path) -> dict[str, np.ndarray]:
    """The arrays the download stage wrote to `path`."""
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: missing, truncated or not a valid .npz ({err}); "
                        "run `dvc repro -f download` to recreate it") from None
    missing = [key for key in ("x_train", "y_train", "x_test", "y_test", "classes") if key not in arrays]
    if missing:
        raise DataError(f"{path}: lacks arrays {', '.join(missing)}; "
                        "run `dvc repro -f download` to recreate it")
    return arrays


def labels_and_classes(raw: dict, label_mode: str) -> tuple[dict, list[str]]:
    """The label arrays for each split, and the class names, of the chosen label mode."""
    coarse = label_mode == "coarse"
    labels = {split: raw[f"y_{split}_coarse" if coarse else f"y_{split}"] for split in SPLITS}
    classes = [str(name) for name in raw["coarse_classes" if coarse else "classes"]]
    return labels, classes


def load_prepared(prepared_dir: Path = PREPARED_DIR) -> dict:
    """x_train, y_train, x_test, y_test and classes, as `prepare` wrote them."""
    prepared = {}
    for name in [f"{kind}_{split}" for kind in ("x", "y") for split in SPLITS] + ["classes"]:
        path = prepared_dir / (f"{name}.json" if name == "classes" else f"{name}.npy")
        try:
            prepared[name] = json.loads(path.read_text()) if name == "classes" else np.load(path)
        except (OSError, ValueError, EOFError) as err:
            raise StageError(f"{path}: missing or corrupt ({err}); "
                             "rebuild it with `dvc repro -f prepare`") from None
    return prepared
