"""The ablation tool (ablation.py): which ingredients a variant uses, and which runs take them away."""

from pathlib import Path

import pytest

from support import TINY_CONV
from resnet_cifar.params import load_params, variant_spec
from resnet_cifar.stage import StageError


def test_ablation_takes_each_ingredient_back_to_the_train_defaults():
    from resnet_cifar.ablation import ingredients_on
    from resnet_cifar.params import train_defaults
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params["variants"]["conv"] = TINY_CONV
    defaults = train_defaults(params)
    conv = ingredients_on(variant_spec(params, "conv"), defaults)
    assert {"standardization", "flips", "alternating flips", "crops", "normalization", "weight decay",
            "warm-up and decay", "label smoothing", "patch whitening", "pool-first transitions", "Dirac initialization",
            "batch norm momentum", "frozen norm scales", "norm learning-rate factor", "logit scale"} <= set(conv)
    assert "translations" not in conv and "mixup" not in conv  # off in the conv variant
    # Some are taken away by another value than the default: random flips, a trained stem, Page's order.
    assert (conv["alternating flips"], conv["flips"]) == ({"flip": True}, {"flip": False})
    assert (conv["patch whitening"], conv["pool-first transitions"]) == ({"stem": 24}, {"downsample": "pool"})
    page = ingredients_on(variant_spec(params | {"variants": {"p": TINY_CONV | {"downsample": "pool", "flip": True,
                                                                                 "stem": 24}}}, "p"), defaults)
    assert not {"alternating flips", "patch whitening", "pool-first transitions"} & set(page)
    assert not any("test-time" in name for name in conv)  # TTA acts on the test set alone
    assert conv["crops"] == {"crop": defaults["crop"]} and conv["warm-up and decay"] == {
        "warmup_epochs": defaults["warmup_epochs"], "schedule": defaults["schedule"]}
    # The assignment's variants use none (the baseline's widths count does not make its blocks "extra").
    assert ingredients_on(variant_spec(params, "baseline"), defaults) == {}


def test_ablation_can_take_away_only_the_named_ingredients():
    from resnet_cifar.ablation import chosen
    uses = {"crops": {"crop": 0}, "flips": {"flip": False}, "GELU": {"activation": "relu"}}
    assert chosen(uses, None) == uses
    assert chosen(uses, ["GELU", "crops"]) == {"GELU": {"activation": "relu"}, "crops": {"crop": 0}}
    with pytest.raises(StageError, match=r"--only: the variant does not use mixup \(it uses: crops, flips, GELU\)"):
        chosen(uses, ["crops", "mixup"])
