"""The whole pipeline, end to end, in a temporary git repo: dvc repro, dvc exp run -S,
dvc metrics diff and the pull-request comment, on a small generated CIFAR-10 archive."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from cifar_archives import make_archive
from support import TINY_CONV, command_line, descendants, interrupt_at, running, tiny_params

PROJECT = Path(__file__).resolve().parents[1]
TINY_PARAMS = tiny_params()
# With airbench94_muon's optimizer ingredients, whose state goes through the pipeline's kill-and-resume
# test too: Muon's momentum, lookahead's slow weights, the whitening bias frozen after an epoch.
TINY_PARAMS["variants"]["conv"] = TINY_CONV | {"epochs": 4, "optimizer": "muon", "muon_lr_factor": 0.5,
                                               "lookahead": True, "whiten_bias_epochs": 1}

pytestmark = pytest.mark.slow


def sh(repo: Path, *args: str) -> str:
    result = subprocess.run(args, cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh project with tiny params, after `dvc repro` and a commit of its results."""
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "src", ".github"):
        source = PROJECT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    every_variant = next(entry for entry in pipeline["plots"] if "validation accuracy of every variant" in entry)
    every_variant["validation accuracy of every variant"]["y"] = {
        f"metrics/curves/accuracy/{variant}.csv": "validation" for variant in TINY_PARAMS["variants"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    archive = make_archive(tmp_path_factory.mktemp("mirror"), "cifar-10-binary", n_train=100, n_test=50)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CIFAR_SOURCE", str(archive.path))
        env.setenv("CIFAR_MEMBER_MD5S", str(archive.md5s_path))
        env.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        sh(root, "git", "init", "-q", "-b", "main")
        sh(root, "git", "config", "user.email", "test@example.com")
        sh(root, "git", "config", "user.name", "test")
        sh(root, "dvc", "init", "-q")
        shutil.copytree(PROJECT / ".dvc" / "plots", root / ".dvc" / "plots")  # the project's plot templates
        sh(root, "git", "add", "-A")
        sh(root, "git", "commit", "-qm", "project")
        sh(root, "dvc", "repro")
        sh(root, "git", "add", "-A")
        sh(root, "git", "commit", "-qm", "tiny run")
        yield root


def test_repro_writes_every_output(repo, tmp_path):
    for variant in TINY_PARAMS["variants"]:
        assert (repo / f"models/{variant}.keras").is_file()
        evaluation = json.loads((repo / f"metrics/variants/{variant}/evaluate.json").read_text())
        assert set(evaluation) == {"train", "test", "overfit_gap", "train_time", "ran_on"}
        timing = json.loads((repo / f"metrics/variants/{variant}/train_time.json").read_text())
        assert evaluation["train_time"] == {key: timing[key] for key in ("train_seconds", "seconds_per_epoch",
                                                                         "peak_memory_mb")}
        assert len(evaluation["test"]["per_class_accuracy"]) == 10
        history = json.loads((repo / f"metrics/variants/{variant}/train/metrics.json").read_text())
        assert history["step"] == TINY_PARAMS["variants"][variant].get("epochs", TINY_PARAMS["train"]["epochs"]) - 1
        confusion = (repo / f"metrics/variants/{variant}/confusion.csv").read_text().splitlines()
        assert confusion[0] == "actual,predicted" and len(confusion) == 1 + 50
        # The reported test accuracy is the share of the confusion matrix's rows on its diagonal.
        pairs = [row.split(",") for row in confusion[1:]]
        assert evaluation["test"]["accuracy"] == round(sum(a == p for a, p in pairs) / len(pairs), 4)
    report = (repo / "metrics/report.md").read_text()
    assert "| small | dense | [16] |" in report and "| deep | dense | [16, 8] |" in report
    assert "| conv | conv | [4, 8] |" in report and "Best of each family: " in report
    ran_on = json.loads((repo / "metrics/variants/small/evaluate.json").read_text())["ran_on"]
    assert re.search(rf"^\| small \|.* \| tensorflow {ran_on['tensorflow']}, {ran_on['precision']}, "
                     rf"{re.escape(ran_on['device'])} \|$", report, re.M), report
    # The conv variant trains in float32: on TensorFlow's CPU, with XLA (runtime.resolve_xla).
    assert re.search(r"^\| conv \|.* \| tensorflow [\d.]+, float32 with XLA, ", report, re.M), report
    assert "**deep vs small**" in report
    for figure in ("comparison.png", "curves_small.png", "curves_deep.png"):
        assert (repo / "metrics/report" / figure).stat().st_size > 1000
    # dvc plots: train against validation per variant, and every variant's validation accuracy in one plot
    plots = json.loads(sh(repo, "dvc", "plots", "show", "--json", "-o", str(tmp_path / "plots")))  # not in the repo
    assert not plots.get("errors"), plots["errors"]
    every_variant = plots["data"]["validation accuracy of every variant"][0]["content"]["data"]["values"]
    for variant in TINY_PARAMS["variants"]:
        epochs = TINY_PARAMS["variants"][variant].get("epochs", TINY_PARAMS["train"]["epochs"])
        history = (repo / f"metrics/variants/{variant}/train/plots/metrics/eval/accuracy.tsv").read_text().split()
        validation = [row["validation"] for row in every_variant if row["filename"] == f"{variant}.csv"]
        assert validation == [f"{float(value):.4f}" for value in history[3::2]]  # (step, accuracy) rows after the header
        assert len(validation) == epochs
        for metric in ("accuracy", "loss"):
            drawn = plots["data"][f"metrics/curves/{metric}/{variant}.csv"][0]["content"]["data"]["values"]
            assert {row["field"] for row in drawn} == {"train", "validation"}
    explore = json.loads((repo / "metrics/explore.json").read_text())
    assert explore["images"] == {"train": 100, "test": 50}
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "status")
    # Evaluations, the report and its figures are committed to git; datasets, models and the train
    # stages' outputs are in the DVC cache, so that a remote's run-cache can restore them.
    tracked = sh(repo, "git", "ls-files").split()
    assert {"metrics/variants/small/evaluate.json", "metrics/report.md", "metrics/explore.json"} <= set(tracked)
    assert not [path for path in tracked if path.startswith(("data/", "models/", "metrics/variants/small/train"))
                and not path.endswith(".gitignore")]
    assert "metrics/variants/small/train_time.json" not in tracked


def test_a_variants_params_touch_only_its_own_stages(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["variants"]["deep"]["dropout"] = 0.3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = set(json.loads(sh(repo, "dvc", "status", "--json")))
    finally:
        sh(repo, "git", "checkout", "params.yaml")
    assert changed == {"train@deep", "evaluate@deep", "report"}


def committed_metrics(repo: Path) -> dict[str, bytes]:
    """Every text file under metrics/ (committed to git, or the train stages' in the DVC cache), less
    the wall times, which differ from run to run."""
    paths = sh(repo, "git", "ls-files", "metrics").split() + [
        str(path.relative_to(repo)) for path in (repo / "metrics/variants").rglob("*")
        if path.is_file() and (path.name == "summary.txt" or "train" in path.relative_to(repo).parts)]
    files = {path: (repo / path).read_bytes() for path in paths if not path.endswith((".png", "train_time.json"))}
    for path in [path for path in files if path.endswith("evaluate.json")]:
        files[path] = json.dumps(json.loads(files[path]) | {"train_time": None}).encode()
    report = re.sub(rb"\| [\d.]+ (s|min) \| [\d.]+ \|", b"|", files["metrics/report.md"])
    files["metrics/report.md"] = re.sub(rb" in [\d.]+ (s|min)", b"", report)  # the families' train times
    return files


def test_a_fresh_clone_reproduces_the_committed_metrics_exactly(repo, tmp_path):
    clone = tmp_path / "clone"
    sh(repo, "git", "clone", "-q", "-b", "main", str(repo), str(clone))
    sh(clone, "dvc", "repro")  # the clone has no DVC cache: every stage runs again
    assert committed_metrics(clone) == committed_metrics(repo)
    # The same weights are saved as the same bytes, so dvc.lock records the same models.
    assert model_hashes(clone) == model_hashes(repo)


def model_hashes(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
            if out["path"].endswith(".keras")}


def test_queued_experiments_run_in_parallel_with_separate_results(repo):
    # (one variant's params, so that each experiment retrains that variant alone)
    for rate in ("0.01", "0.001"):
        sh(repo, "dvc", "exp", "run", "--queue", "-n", f"lr-{rate}", "-S", f"++variants.small.learning_rate={rate}")
    # A pull request's short check: one cap for every variant, whatever its own epochs (conv: 4).
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "capped", "-S", "train.max_epochs=1")
    sh(repo, "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and re.search(r"Queued|Running", sh(repo, "dvc", "queue", "status")):
        time.sleep(2)
    status = sh(repo, "dvc", "queue", "status")
    assert status.count("Success") == 3, status
    experiments = {}
    for row in json.loads(sh(repo, "dvc", "exp", "show", "--json")):
        for exp in row.get("experiments") or []:
            run = exp["revs"][0]
            experiments[run["name"]] = run["data"]
    assert set(experiments) == {"lr-0.01", "lr-0.001", "capped"}
    capped = experiments.pop("capped")["metrics"]
    for variant in TINY_PARAMS["variants"]:  # DVCLive's step counts epochs from 0
        assert capped[f"metrics/variants/{variant}/train/metrics.json"]["data"]["step"] == 0, variant
    test_losses = set()
    for name, run in experiments.items():
        assert run["params"]["params.yaml"]["data"]["variants"]["small"]["learning_rate"] == float(name[3:])
        test_losses.add(run["metrics"]["metrics/variants/small/evaluate.json"]["data"]["test"]["loss"])
    assert len(test_losses) == 2


def test_ablation_runs_an_experiment_per_ingredient_and_tabulates_them(repo):
    from resnet_cifar.ablation import ABLATION_MD, markers
    readme = repo / "docs/tuning.md"
    readme.parent.mkdir(exist_ok=True)
    readme.write_text(f"# project\n\n{markers('deep')[0]}\nan old table\n{markers('deep')[1]}\n\nmore\n")
    try:
        # The tiny `deep` variant's one ingredient is dropout (0.1).
        sh(repo, sys.executable, "-m", "resnet_cifar.ablation", "--variant", "deep", "--epochs", "1")
        experiments = {}
        for row in json.loads(sh(repo, "dvc", "exp", "show", "--json")):
            for exp in row.get("experiments") or []:
                if exp["revs"][0]["name"].startswith("ablation-"):  # not the queue test's
                    experiments[exp["revs"][0]["name"]] = exp["revs"][0]["data"]
        table = (repo / ABLATION_MD).read_text()
        written = readme.read_text()
    finally:
        subprocess.run(["dvc", "exp", "remove", "ablation-deep-reference", "ablation-deep-dropout"], cwd=repo)
        readme.unlink()
        (repo / ABLATION_MD).unlink(missing_ok=True)
    assert set(experiments) == {"ablation-deep-reference", "ablation-deep-dropout"}
    # Taken away, dropout is removed from the variant, which then has the train default's 0.0.
    for name, dropout in (("ablation-deep-reference", 0.1), ("ablation-deep-dropout", None)):
        params = experiments[name]["params"]["params.yaml"]["data"]
        deep = params["variants"]["deep"]
        # Every run, the reference too, is compared on a validation split, never on the test set.
        assert (params["train"]["max_epochs"], deep.get("dropout"), deep["validation"]) == (1, dropout, 0.1)
        trained = experiments[name]["metrics"]["metrics/variants/deep/train/metrics.json"]["data"]
        accuracy = trained["eval"]["accuracy"]  # on the validation split
        assert trained["step"] == 0  # one epoch, capped by max_epochs
        label = "every ingredient" if dropout else "without dropout"
        assert re.search(rf"\| (deep, )?{label} \| {accuracy:.4f} \|", table), table
    assert "(1 epoch per run; accuracy at the last epoch on a validation split of 0.1" in table
    assert table.startswith(markers("deep")[0] + "\n") and table.endswith(markers("deep")[1] + "\n")
    assert written == f"# project\n\n{table}\nmore\n"  # the same table, between the same markers
    assert sh(repo, "git", "status", "--porcelain") == ""  # the workspace is as it was


def test_exp_run_metrics_diff_and_pull_request_comment(repo):
    sh(repo, "dvc", "exp", "run", "-S", "++variants.small.epochs=3")  # retrains `small` alone
    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "--json"))
    step = diff["metrics/variants/small/train/metrics.json"]["step"]
    assert (step["old"], step["new"]) == (1, 2)
    assert "variants.small.epochs" in sh(repo, "dvc", "exp", "show", "--csv")

    sh(repo, "git", "checkout", "-qb", "three-epochs")
    sh(repo, "git", "commit", "-qam", "three epochs")
    comment = sh(repo, ".github/pr-comment.sh", "main")
    assert comment.startswith("## Results: this branch vs `main`\n")
    # The table people read first: one row per variant, main against the branch.
    accuracy = {revision: json.loads(sh(repo, "git", "show", f"{revision}:metrics/variants/small/evaluate.json"))
                ["test"]["accuracy"] for revision in ("main", "three-epochs")}
    change = f"{(accuracy['three-epochs'] - accuracy['main']) * 100:+.2f} points"
    assert re.search(rf"^\| small \| {accuracy['main']:.4f} \| {accuracy['three-epochs']:.4f} \| "
                     rf"{re.escape(change)} \| [\d.]+ min \| [\d.]+ min \|$", comment, re.M), comment
    assert [line.split(" | ")[0] for line in comment.splitlines() if re.match(r"^\| (small|deep|conv) ", line)] == [
        "| conv", "| deep", "| small"]
    # The full diffs follow, collapsed.
    assert "<details><summary>All metrics" in comment and "<details><summary>Params" in comment
    assert re.search(r"\| metrics/variants/small/train/metrics.json +\| step +\| 1 +\| 2 ", comment)
    assert re.search(r"\| params.yaml +\| variants.small.epochs +\| - +\| 3 ", comment)


def history(repo: Path, variant: str) -> dict[str, bytes]:
    """The train stage's DVCLive history and model summary."""
    outputs = repo / "metrics/variants" / variant
    return {str(path): path.read_bytes() for path in [outputs / "summary.txt", *sorted((outputs / "train").rglob("*"))]
            if path.is_file()}


def test_dvc_repro_resumes_a_killed_training_stage(repo):
    """The tiny conv variant, killed after its second of four epochs, resumes and ends bit-identical to
    the committed, uninterrupted run."""
    committed = keras.models.load_model(repo / "models/conv.keras", compile=False).get_weights()
    committed_history = history(repo, "conv")
    interrupt_at(["dvc", "repro", "-f", "train@conv"], "[conv] epoch 2/4", cwd=repo)

    resumed = sh(repo, "dvc", "repro", "-f", "train@conv")  # without -f, DVC restores the committed run from its run-cache
    resumed_after = re.search(r"\[conv\] resuming after epoch (\d+) from .dvc/tmp/checkpoints/conv/", resumed)
    assert resumed_after and int(resumed_after[1]) >= 1, resumed[:3000]  # killed while saving epoch 2, or later
    assert "[conv] epoch 1/4" not in resumed
    assert not (repo / ".dvc/tmp/checkpoints/conv").exists()
    # The DVCLive history and summary are the committed ones byte for byte (the wall times are
    # not); so are the weights.
    assert history(repo, "conv") == committed_history
    for resumed_weights, reference in zip(keras.models.load_model(repo / "models/conv.keras", compile=False).get_weights(),
                                          committed):
        np.testing.assert_array_equal(resumed_weights, reference)


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])  # dash runs the stage as its child; bash as itself
def test_a_stage_ends_with_the_dvc_that_started_it_and_leaves_what_git_tracks(repo, shell):
    """SIGTERM to `dvc repro` alone, as `timeout` sends it (DVC passes nothing on to its stage): the
    train stage stops within seconds, removing its outputs but no file that git tracks."""
    params_file = repo / "params.yaml"
    committed = params_file.read_text()
    params = yaml.safe_load(committed)
    params["variants"]["small"]["epochs"] = 10_000
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        dvc = subprocess.Popen(["dvc", "repro", "train@small"], cwd=repo, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=os.environ | {"SHELL": shell})
        for line in dvc.stdout:
            if line.startswith("[small] epoch 2/10000"):
                break
        # the train stage this dvc started, not another test's on another worker
        stages = [pid for pid in descendants(dvc.pid) if "resnet_cifar.train\0small" in command_line(pid)]
        assert len(stages) == 1
        dvc.terminate()
        dvc.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while running(int(stages[0])) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(int(stages[0]))
        changed = sh(repo, "git", "status", "--porcelain").splitlines()  # the files the run was meant to change
        assert " M params.yaml" in changed and set(changed) <= {" M params.yaml", " M dvc.lock"}, changed
        assert not (repo / "models/small.keras").exists()
    finally:
        params_file.write_text(committed)
        shutil.rmtree(repo / ".dvc/tmp/checkpoints/small", ignore_errors=True)
        sh(repo, "dvc", "checkout", "-q", "train@small")
