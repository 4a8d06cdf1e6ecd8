import copy

TINY_PARAMS = {
    "seed": 0,
    "data": {"dataset": "cifar10", "label_mode": "fine"},
    "train": {"epochs": 2, "batch_size": 16, "optimizer": "adam", "learning_rate": 0.003,
              "validation": "test", "dropout": 0.0, "l2": 0.0},
    "variants": {"small": {"widths": [16]},
                 "deep": {"widths": [16, 8], "dropout": 0.1, "l2": [0.001, 0.01]}},
}


def tiny_params(dataset: str = "cifar10", label_mode: str = "fine") -> dict:
    """Params for fast runs on generated archives: two small variants, two epochs."""
    params = copy.deepcopy(TINY_PARAMS)
    params["data"] = {"dataset": dataset, "label_mode": label_mode}
    return params
