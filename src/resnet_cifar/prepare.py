"""Stage `prepare`: pixels / 255 as float32 in [0, 1] and one-hot labels, as the assignment.

Writes data/prepared/ holding x_train.npy, y_train.npy, x_test.npy, y_test.npy (one-hot,
float32) and classes.json. `data.label_mode` picks CIFAR-100's fine or coarse labels.
"""

import json
from pathlib import Path

import numpy as np

from resnet_cifar.datasets import SPLITS, labels_and_classes, load_raw
from resnet_cifar.params import data_params, load_params
from resnet_cifar.paths import PREPARED_DIR, raw_path
from resnet_cifar.stage import atomic_path, run

def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1], in one allocation the size of the result."""
    return np.divide(images, np.float32(255), dtype=np.float32)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ids -> float32 one-hot rows (what categorical cross-entropy expects)."""
    encoded = np.zeros((len(labels), num_classes), dtype=np.float32)
    encoded[np.arange(len(labels)), labels] = 1.0
    return encoded


def write_prepared(raw: dict, label_mode: str, out_dir: Path = PREPARED_DIR) -> None:
    """Normalize, one-hot encode and save, printing the assignment's checks."""
    labels, classes = labels_and_classes(raw, label_mode)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            # One split at a time, so only one float32 copy of the images is ever in memory.
            x = normalize(raw[f"x_{split}"])
            y = one_hot(labels[split], len(classes))
            print(f"x_{split}: {x.shape} {x.dtype}, min {x.min():.1f}, max {x.max():.1f}; "
                  f"y_{split}: {y.shape} one-hot")
            np.save(tmp / f"x_{split}.npy", x)
            np.save(tmp / f"y_{split}.npy", y)
            del x
        (tmp / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    print(f"wrote {out_dir}/ ({len(classes)} classes)")


def main(argv: list[str]) -> None:
    params = data_params(load_params())
    write_prepared(load_raw(raw_path(params.dataset)), params.label_mode)


if __name__ == "__main__":
    run(main)
