"""The train and evaluate stages give the same numbers, byte for byte, as the code of REFERENCE, a
commit in this repository's history: the same params and data make the same weights, history,
metrics and predictions. A change meant to alter numbers moves REFERENCE to the commit that makes
it, in the same pull request, and says why."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from resnet_cifar import models, paths, prepare  # noqa: F401 (models: the layers a saved model holds)
from support import EVERY_INGREDIENT, TINY_CONV, setup_project

# The last commit before the refactoring of devices, precision, standardization and the network's
# config: a code change whose numbers this one must reproduce.
REFERENCE = "59e7e53b5184e4c05cd42c9e76791f7479c516c0"
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "dense": {**EVERY_INGREDIENT, "widths": [16], "epochs": 2},
    "assignment": {"widths": [16, 8], "dropout": 0.1, "l2": [0.001, 0.01], "norm": "batch"},
    "conv": {**TINY_CONV, "epochs": 2},
}
# Every variant trained, then evaluated, in one process per code version (a process per stage
# would spend most of the test importing TensorFlow).
STAGES = ("from resnet_cifar import evaluate, train\n"
          "for variant in {variants!r}:\n"
          "    train.main([variant])\n"
          "    evaluate.main([variant])\n")

pytestmark = pytest.mark.slow


def reference_source(into: Path) -> Path:
    """REFERENCE's src/ directory and params.yaml, exported from git; skips the test where the
    history lacks it."""
    archive = into / "reference.tar"
    exported = subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), REFERENCE, "src",
                               "params.yaml"], capture_output=True, text=True)
    if exported.returncode != 0:
        pytest.skip(f"commit {REFERENCE[:7]} is not in this clone's history (a shallow clone?): "
                    f"{exported.stderr.strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def without_newer_keys(train: dict, reference_params: Path) -> dict:
    """The train section less the keys added since REFERENCE (which its code refuses): each must be
    at the project's value, which turns its ingredient off, for the numbers to compare."""
    known = yaml.safe_load(reference_params.read_text())["train"]
    return {key: value for key, value in train.items() if key in known}


def results(variant: str) -> dict:
    """What the stages wrote for `variant`, less the times and the machine they ran on."""
    evaluation = json.loads(paths.evaluate_path(variant).read_text())
    del evaluation["train_time"], evaluation["ran_on"]
    return {"weights": keras.models.load_model(paths.model_path(variant), compile=False).get_weights(),
            "history": paths.live_outputs(variant)[0].read_text(),
            "evaluation": evaluation,
            "predictions": paths.confusion_path(variant).read_text()}


def run_stages(project: Path, source: Path, monkeypatch) -> dict[str, dict]:
    monkeypatch.chdir(project)
    environment = os.environ | {"PYTHONPATH": str(source)}
    ran = subprocess.run([sys.executable, "-c", STAGES.format(variants=list(VARIANTS))], env=environment,
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return {variant: results(variant) for variant in VARIANTS}


def test_the_stages_give_the_numbers_of_the_reference_commit_byte_for_byte(tmp_path, monkeypatch):
    old_source = reference_source(tmp_path)
    projects = {}
    for code in ("reference", "current"):
        projects[code] = tmp_path / code
        projects[code].mkdir()
        setup_project(projects[code], monkeypatch, "cifar-10-binary", n_train=256)
        prepare.main([])
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["variants"] = VARIANTS
        if code == "reference":
            params["train"] = without_newer_keys(params["train"], tmp_path / "params.yaml")
        else:  # as REFERENCE trained: XLA computes the conv network within float rounding of it (test_train)
            params["train"]["xla"] = False
        Path("params.yaml").write_text(yaml.safe_dump(params))
    reference = run_stages(projects["reference"], old_source, monkeypatch)
    current = run_stages(projects["current"], ROOT / "src", monkeypatch)
    for variant in VARIANTS:
        assert current[variant]["history"] == reference[variant]["history"], variant
        assert current[variant]["evaluation"] == reference[variant]["evaluation"], variant
        assert current[variant]["predictions"] == reference[variant]["predictions"], variant
        assert len(current[variant]["weights"]) == len(reference[variant]["weights"]), variant
        for now, then in zip(current[variant]["weights"], reference[variant]["weights"]):
            np.testing.assert_array_equal(now, then, err_msg=variant)
