"""dvc.yaml lists, for every stage, exactly the modules its command imports, so that a change to
any of them reruns the stage and a change to any other does not."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = PROJECT / "src" / "resnet_cifar"


def imported_modules(module: str) -> set[str]:
    """The package's modules that `module` imports, directly or through another of them."""
    seen, todo = set(), [module, "__init__"]  # the package runs first: it picks the Keras backend
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "resnet_cifar":
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resnet_cifar."):
                todo.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("resnet_cifar.")]
    return seen


def stages() -> dict[str, dict]:
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in pipeline.items()}


@pytest.mark.parametrize("name", list(stages()))
def test_each_stage_depends_on_exactly_the_modules_it_imports(name):
    stage = stages()[name]
    module = re.match(r"python -m resnet_cifar\.(\w+)", stage["cmd"]).group(1)
    listed = {Path(dep).stem for dep in stage["deps"] if str(dep).startswith("src/resnet_cifar/")}
    assert listed == imported_modules(module), f"dvc.yaml, stage {name}: deps differ from its imports"


def test_the_import_scan_follows_imports_through_other_modules():
    # The check above fails when a module gains an import that dvc.yaml does not list.
    assert "augment" in imported_modules("train") and "augment" not in imported_modules("evaluate")
    assert "models" not in imported_modules("report")


@pytest.mark.parametrize("module", ["report", "ablation"])
def test_stages_that_only_read_results_do_not_load_tensorflow(module):
    code = (f"import sys, resnet_cifar.{module}; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_stage_prints_no_tensorflow_start_up_lines(tmp_path):
    # The train stage imports TensorFlow, whose C++ start-up notices (no GPU, CPU features)
    # would come before the stage's own message.
    stage = subprocess.run([sys.executable, "-m", "resnet_cifar.train"], cwd=tmp_path, capture_output=True,
                           text=True)
    assert stage.returncode == 1
    assert stage.stderr == "error: usage: python -m resnet_cifar.train <variant>\n"


def test_the_plot_of_every_variant_lists_every_variant():
    from resnet_cifar.paths import curves_path
    plots = {name: plot for entry in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["plots"]
             for name, plot in entry.items()}
    variants = yaml.safe_load((PROJECT / "params.yaml").read_text())["variants"]
    listed = plots["validation accuracy of every variant"]["y"]
    assert listed == {str(curves_path("accuracy", variant)): "validation" for variant in variants}, \
        "dvc.yaml: the plot 'validation accuracy of every variant' must list one file per variant of params.yaml"


def test_the_plot_of_every_variant_draws_each_in_its_own_color():
    """`dvc plots show` of the committed curves: the plot of every variant colors its lines by the
    variant (named in the legend) and dashes them by revision, for `dvc plots diff`."""
    [definition] = [plot for plot in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["plots"]
                    if "validation accuracy of every variant" in plot]
    shown = subprocess.run([str(Path(sys.executable).parent / "dvc"), "plots", "show", "--json"], cwd=PROJECT,
                           capture_output=True, text=True, check=True)
    [plot] = json.loads(shown.stdout)["data"]["validation accuracy of every variant"]
    spec = plot["content"]
    assert spec["encoding"]["color"]["field"] == "variant" and spec["encoding"]["strokeDash"]["field"] == "rev"
    assert spec["transform"] == [{"calculate": "replace(peek(split(datum.filename, '/')), '.csv', '')",
                                  "as": "variant"}]
    files = {Path(path).name for path in definition["validation accuracy of every variant"]["y"]}
    assert {point["filename"] for point in spec["data"]["values"]} == files  # a variant per file
