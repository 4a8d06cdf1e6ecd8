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
    assert (conv["patch whitening"], conv["pool-first transitions"]) == ({"stem": 24, "whiten_bias_epochs": 0},
                                                                         {"downsample": "pool"})
    page = ingredients_on(variant_spec(params | {"variants": {"p": TINY_CONV | {"downsample": "pool", "flip": True,
                                                                                 "stem": 24}}}, "p"), defaults)
    assert not {"alternating flips", "patch whitening", "pool-first transitions"} & set(page)
    assert not any("test-time" in name for name in conv)  # TTA acts on the test set alone
    assert conv["crops"] == {"crop": defaults["crop"]} and conv["warm-up and decay"] == {
        "warmup_epochs": defaults["warmup_epochs"], "warmup_from": defaults["warmup_from"], "schedule": defaults["schedule"]}
    # The assignment's variants use none (the baseline's widths count does not make its blocks "extra").
    assert ingredients_on(variant_spec(params, "baseline"), defaults) == {}


def test_ablation_can_take_away_only_the_named_ingredients():
    from resnet_cifar.ablation import chosen
    uses = {"crops": {"crop": 0}, "flips": {"flip": False}, "GELU": {"activation": "relu"}}
    assert chosen(uses, None) == uses
    assert chosen(uses, ["GELU", "crops"]) == {"GELU": {"activation": "relu"}, "crops": {"crop": 0}}
    with pytest.raises(StageError, match=r"--only: the variant does not use mixup \(it uses: crops, flips, GELU\)"):
        chosen(uses, ["crops", "mixup"])


def test_an_ingredient_back_at_its_default_is_removed_from_the_variant_not_set():
    from resnet_cifar.ablation import INGREDIENTS, ingredients_on, without
    from resnet_cifar.params import train_defaults
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    muon = TINY_CONV | {"optimizer": "muon", "muon_lr_factor": 0.24, "momentum": 0.85, "lookahead": True,
                        "whiten_bias_epochs": 1, "warmup_from": 0.2}
    params["variants"] = {"conv": muon}
    uses = ingredients_on(variant_spec(params, "conv"), train_defaults(params))
    assert {"Muon for the filters", "momentum", "lookahead", "frozen whitening bias",
            "warm-up from a fraction of the rate", "optimizer (vs the default's)"} <= set(uses)
    changed, arguments = without(params, "conv", uses["Muon for the filters"])
    assert arguments == ["~variants.conv.muon_lr_factor", "++variants.conv.optimizer=\"nesterov\""]
    assert changed == {key: value for key, value in muon.items() if key != "muon_lr_factor"} | {"optimizer": "nesterov"}
    # Set to Adam's values, momentum would still be named, which the params check refuses with Adam.
    changed, arguments = without(params, "conv", uses["optimizer (vs the default's)"])
    assert "~variants.conv.momentum" in arguments and "momentum" not in changed
    for ingredient, off in uses.items():  # every run the ablation would start passes the params check
        variant_spec(params | {"variants": {"conv": without(params, "conv", off)[0]}}, "conv")
    assert INGREDIENTS["plain blocks (no shortcuts)"] == {"shortcuts": None}


def test_the_ablation_table_ranks_by_accuracy_with_test_time_augmentation_where_measured():
    from resnet_cifar.ablation import ablation_table

    def measured(single, tta=None):
        return {"train": {"accuracy": 0.95}, "eval": {"accuracy": single} | ({"accuracy_tta": tta} if tta else {})}

    rows = ablation_table("conv", 8, 0.1, measured(0.92, 0.93),
                          {"lookahead": measured(0.915, 0.922), "crops": measured(0.91, 0.926)})
    assert rows[2] == "| run | validation acc, TTA | validation acc | train acc | gap | ingredient is worth |"
    assert rows[5:] == ["| without lookahead | 0.9220 | 0.9150 | 0.9500 | 0.0350 | +0.8 points |",
                        "| without crops | 0.9260 | 0.9100 | 0.9500 | 0.0400 | +0.4 points |"]
    plain = ablation_table("deep", 1, 0.1, measured(0.5), {"dropout": measured(0.45)})
    assert plain[2] == "| run | validation acc | train acc | gap | ingredient is worth |"
    assert plain[-1] == "| without dropout | 0.4500 | 0.9500 | 0.5000 | +5.0 points |"
