"""The training batches and the validation split (batches.py)."""

import numpy as np

from resnet_cifar import batches


def test_validation_fraction_holds_out_part_of_train():
    x = np.arange(100)[:, None]
    prepared = {"x_train": x, "y_train": x, "x_test": x[:5], "y_test": x[:5]}
    (x_fit, _), (x_val, _) = batches.split_validation(prepared, 0.2, seed=0)
    assert len(x_fit) == 80 and len(x_val) == 20
    assert sorted(np.concatenate([x_fit, x_val]).ravel().tolist()) == list(range(100))
    (_, _), (x_val_test, _) = batches.split_validation(prepared, "test", seed=0)
    assert len(x_val_test) == 5
