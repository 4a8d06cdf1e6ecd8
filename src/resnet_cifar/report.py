"""Stage `report`: every variant side by side, in metrics/report.md and its figures, and each
variant's learning curves in metrics/curves/ for `dvc plots`.

    python -m resnet_cifar.report                                  the stage: every variant
    python -m resnet_cifar.report --out DIR VARIANT [VARIANT ...]  these variants alone, in DIR/

The second form reports some variants, once their evaluate stages have run (for the assignment's
four: `dvc repro evaluate@baseline evaluate@deeper evaluate@dropout evaluate@l2`), into DIR/report.md
and DIR/report/, and leaves the stage's report alone.

The table, the best variant and the discussion are all computed from the variants' metrics:
each variant is compared with the earlier variant it differs from least, so the text says what
that difference (depth and width, dropout, L2, learning rate) did to accuracy and overfitting.
"""

import argparse
import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resnet_cifar.params import PER_WIDTH_KEYS, VariantSpec, load_params, variant_names, variant_spec
from resnet_cifar.paths import REPORT_FIGURES_DIR as FIGURES_DIR
from resnet_cifar.paths import CURVES_DIR, REPORT_MD, curves_path, evaluate_path, live_dir, timing_path
from resnet_cifar.plots import plt, save_figure
from resnet_cifar.stage import StageError, all_or_nothing, atomic_path, run
COMPARED_FIELDS = tuple(f.name for f in dataclasses.fields(VariantSpec) if f.name not in ("name", "seed"))
TABLE_FIELDS = ("arch", "widths", "learning_rate", "dropout", "l2")  # the rest appear under "recipe"
NEGLIGIBLE = 0.005  # accuracy changes under half a point are noise between seeds


@dataclass
class Result:
    """What one trained and evaluated variant measured."""

    spec: VariantSpec
    history: dict[str, np.ndarray]  # train/eval loss/accuracy per epoch
    summary: dict  # DVCLive's summary: final metrics, parameters
    timing: dict  # train_seconds, seconds_per_epoch
    evaluation: dict  # evaluate.json

    @property
    def test_accuracy(self) -> float:
        return self.evaluation["test"]["accuracy"]

    @property
    def gap(self) -> float:
        return self.evaluation["overfit_gap"]

    @property
    def best_epoch(self) -> int:
        return int(np.argmax(self.history["eval/accuracy"])) + 1


def read_history(variant: str) -> dict[str, np.ndarray]:
    history = {}
    for split in ("train", "eval"):
        for metric in ("loss", "accuracy"):
            path = live_dir(variant) / "plots" / "metrics" / split / f"{metric}.tsv"
            with open(path, newline="") as tsv:
                history[f"{split}/{metric}"] = np.array(
                    [float(row[metric]) for row in csv.DictReader(tsv, delimiter="\t")])
    return history


def read_result(spec: VariantSpec) -> Result:
    try:
        return Result(
            spec=spec,
            history=read_history(spec.name),
            summary=json.loads((live_dir(spec.name) / "metrics.json").read_text()),
            timing=json.loads(timing_path(spec.name).read_text()),
            evaluation=json.loads(evaluate_path(spec.name).read_text()),
        )
    except (OSError, ValueError, KeyError) as err:
        raise StageError(f"variant {spec.name}: cannot read its metrics ({err}); "
                         f"run `dvc repro evaluate@{spec.name}` first") from None


def training_curves(result: Result) -> plt.Figure:
    """The assignment's figure: loss and accuracy per epoch, train against validation."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, len(result.history["train/loss"]) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, result.history[f"train/{metric}"], label="train")
        ax.plot(epochs, result.history[f"eval/{metric}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{result.spec.name}: {metric}")
        ax.legend()
    fig.tight_layout()
    return fig


def comparison(results: list[Result]) -> plt.Figure:
    """Validation accuracy per epoch of every variant, and final train vs test accuracy."""
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for result in results:
        curves.plot(np.arange(1, len(result.history["eval/accuracy"]) + 1),
                    result.history["eval/accuracy"], label=result.spec.name)
    curves.set_xlabel("epoch")
    curves.set_ylabel("validation accuracy")
    curves.legend()
    positions = np.arange(len(results))
    bars.bar(positions - 0.2, [r.evaluation["train"]["accuracy"] for r in results], 0.4, label="train")
    bars.bar(positions + 0.2, [r.test_accuracy for r in results], 0.4, label="test")
    bars.set_xticks(positions, [r.spec.name for r in results])
    bars.set_ylabel("accuracy")
    bars.set_title("final accuracy: the gap is overfitting")
    bars.legend()
    fig.tight_layout()
    return fig


def describe_change(field: str, before, after) -> str:
    if field == "widths":
        return f"widths {list(before)} -> {list(after)} ({len(before)} -> {len(after)} stages)"
    if field == "l2":
        return f"L2 {_l2_text(before)} -> {_l2_text(after)}"
    if field in PER_WIDTH_KEYS:
        return f"{field} {_per_width_text(before)} -> {_per_width_text(after)}"
    return f"{field.replace('_', ' ')} {_value_text(before)} -> {_value_text(after)}"


def _value_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _per_width_text(values: tuple) -> str:
    """One value when every width has it, else the list."""
    return _value_text(values[0]) if len(set(values)) == 1 else "[" + ", ".join(map(_value_text, values)) + "]"


def _l2_text(factors: tuple[float, ...]) -> str:
    return _per_width_text(factors) if any(factors) else "none"


def changed_fields(a: VariantSpec, b: VariantSpec) -> list[str]:
    def setting(spec: VariantSpec, field: str):
        value = getattr(spec, field)
        return _per_width_text(value) if field in PER_WIDTH_KEYS else value
    return [field for field in COMPARED_FIELDS if setting(a, field) != setting(b, field)]


def _parameters_change(reference: Result, result: Result) -> str:
    before, after = reference.summary["parameters"], result.summary["parameters"]
    return f", parameters {before:,} -> {after:,}" if before != after else ""


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _points(delta: float) -> str:
    return f"{delta * 100:+.1f} points"


def verdict(delta_accuracy: float, delta_gap: float) -> str:
    if abs(delta_accuracy) < NEGLIGIBLE:
        effect = "made no real difference to test accuracy"
    else:
        effect = "raised test accuracy" if delta_accuracy > 0 else "lowered test accuracy"
    if abs(delta_gap) < NEGLIGIBLE:
        return effect + " and left overfitting as it was"
    return effect + (" and reduced overfitting" if delta_gap < 0 else " and increased overfitting")


def discuss(results: list[Result]) -> list[str]:
    """One paragraph per variant: what changed against its closest earlier variant, and the effect."""
    paragraphs = []
    for i, result in enumerate(results[1:], start=1):
        reference = min(results[:i], key=lambda r: len(changed_fields(r.spec, result.spec)))
        fields = changed_fields(reference.spec, result.spec)
        if not fields:
            changes = "the same settings"
        else:
            changes = "; ".join(describe_change(f, getattr(reference.spec, f), getattr(result.spec, f))
                                for f in fields)
        delta_accuracy = result.test_accuracy - reference.test_accuracy
        delta_gap = result.gap - reference.gap
        paragraphs.append(
            f"**{result.spec.name} vs {reference.spec.name}** ({changes}): "
            f"test accuracy {reference.test_accuracy:.4f} -> {result.test_accuracy:.4f} "
            f"({_points(delta_accuracy)}), overfitting gap {reference.gap:.4f} -> {result.gap:.4f} "
            f"({_points(delta_gap)}){_parameters_change(reference, result)}. "
            f"{'These changes' if len(fields) > 1 else 'The change'} "
            f"{verdict(delta_accuracy, delta_gap)}."
        )
    return paragraphs


def validation_course(r: Result) -> str:
    """Where the variant's validation accuracy peaked, and where it ended."""
    validation = r.history["eval/accuracy"]
    if r.best_epoch == len(validation):
        return f"validation accuracy highest in the last epoch, {r.best_epoch}, at {validation[-1]:.4f}"
    return (f"validation accuracy peaked at {validation.max():.4f} in epoch {r.best_epoch} of {len(validation)} "
            f"and ended at {validation[-1]:.4f}")


def overview(results: list[Result]) -> list[str]:
    best = max(results, key=lambda r: r.test_accuracy)
    most_overfit = max(results, key=lambda r: r.gap)
    lines = [f"Best test accuracy: **{best.spec.name}** with {best.test_accuracy:.4f}."]
    for r in results:
        lines.append(f"{r.spec.name}: {validation_course(r)}; train accuracy "
                     f"{r.history['train/accuracy'][-1]:.4f} on the last epoch's training batches (as trained: "
                     f"augmented, with dropout), {r.evaluation['train']['accuracy']:.4f} on the training "
                     "images as evaluated (the table's).")
    lines.append(f"Largest overfitting gap: {most_overfit.spec.name} "
                 f"({_points(most_overfit.gap).lstrip('+')} between train and test accuracy).")
    return lines + families(results)


def families(results: list[Result]) -> list[str]:
    """The best variant of each network family (dense, conv), and what the best one buys over
    the others in accuracy and train time."""
    best = {}
    for r in results:
        if r.spec.arch not in best or r.test_accuracy > best[r.spec.arch].test_accuracy:
            best[r.spec.arch] = r
    if len(best) < 2:
        return []
    ranked = sorted(best.values(), key=lambda r: r.test_accuracy, reverse=True)
    top = ranked[0]
    return ["Best of each family: " + ", ".join(
        f"{r.spec.arch} **{r.spec.name}** {r.test_accuracy:.4f} in {_duration(r.timing['train_seconds'])}"
        for r in ranked) + f"; {top.spec.arch} leads by "
        + ", ".join(f"{_points(top.test_accuracy - r.test_accuracy).lstrip('+')} over {r.spec.arch}"
                    for r in ranked[1:]) + "."]


def recipe(spec: VariantSpec, reference: VariantSpec) -> str:
    """The settings outside the table's columns where `spec` differs from `reference`."""
    def text(field: str) -> str:
        value = getattr(spec, field)
        return _per_width_text(value) if field in PER_WIDTH_KEYS else _value_text(value)
    return ", ".join(f"{field.replace('_', ' ')} {text(field)}"
                     for field in changed_fields(reference, spec) if field not in TABLE_FIELDS) or "-"


def results_table(results: list[Result]) -> list[str]:
    reference = results[0]
    rows = [f"| variant | family | widths | lr | dropout | L2 | recipe (vs {reference.spec.name}) | parameters "
            "| train loss | train acc | test loss | test acc | gap | epochs | best epoch | train time "
            f"| x {reference.spec.name}'s | ran on |",
            "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ratio = r.timing["train_seconds"] / reference.timing["train_seconds"]
        rows.append(
            f"| {r.spec.name} | {r.spec.arch} | {list(r.spec.widths)} | {r.spec.learning_rate:g} | {r.spec.dropout:g} "
            f"| {_l2_text(r.spec.l2)} | {recipe(r.spec, results[0].spec)} | {r.summary['parameters']:,} "
            f"| {r.evaluation['train']['loss']:.4f} | {r.evaluation['train']['accuracy']:.4f} "
            f"| {r.evaluation['test']['loss']:.4f} | {r.test_accuracy:.4f} | {r.gap:.4f} "
            f"| {len(r.history['train/loss'])} | {r.best_epoch} "
            f"| {_duration(r.timing['train_seconds'])} | {ratio:.1f} | {ran_on(r.evaluation['ran_on'])} |")
    return rows


def ran_on(record: dict) -> str:
    """Where a variant trained: backend and version, precision (and XLA), device."""
    xla = " with XLA" if record["xla"] else ""
    return f"{record['backend']} {record[record['backend']]}, {record['precision']}{xla}, {record['device']}"


def write_curves(result: Result) -> None:
    """The variant's train and validation accuracy and loss by epoch, one CSV file per metric."""
    for metric in ("accuracy", "loss"):
        train, validation = result.history[f"train/{metric}"], result.history[f"eval/{metric}"]
        with atomic_path(curves_path(metric, result.spec.name)) as tmp, open(tmp, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["epoch", "train", "validation"])
            writer.writerows((epoch, f"{t:.4f}", f"{v:.4f}") for epoch, (t, v) in enumerate(zip(train, validation), 1))


def write_report(results: list[Result], report_md: Path, figures_dir: Path, made_by: str) -> None:
    """The report of `results` in `report_md`, with its figures in `figures_dir`."""
    for result in results:
        save_figure(training_curves(result), figures_dir / f"curves_{result.spec.name}.png")
    save_figure(comparison(results), figures_dir / "comparison.png")
    figures = figures_dir.relative_to(report_md.parent)
    lines = ["# Residual networks on CIFAR: variant comparison", "",
             f"Generated by `{made_by}` from the metrics under `metrics/variants/`. "
             "The gap is train accuracy minus test accuracy; the best epoch is the one with "
             "the highest validation accuracy. Train times are comparable within one run on one machine "
             "(the last column: the backend, the precision `auto` resolved to, the device).", "",
             *results_table(results), "", *overview(results), "",
             f"![comparison]({figures}/comparison.png)", "", "## Discussion", ""]
    for paragraph in discuss(results):
        lines += [paragraph, ""]
    lines += ["## Training curves", ""]
    lines += [f"![{r.spec.name}]({figures}/curves_{r.spec.name}.png)" for r in results]
    with atomic_path(report_md) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"wrote {report_md} and {figures_dir}/")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m resnet_cifar.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="with VARIANTs: the directory of their report")
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help="report these alone (default: every one)")
    args = parser.parse_args(argv)
    if bool(args.out) != bool(args.variants):
        raise StageError("usage: python -m resnet_cifar.report [--out DIR VARIANT ...]: a report of some variants "
                         f"goes to a directory of its own ({REPORT_MD} is the report of every variant)")
    params = load_params()
    results = [read_result(variant_spec(params, name)) for name in args.variants or variant_names(params)]
    if args.out:
        report_md = args.out / "report.md"
        with all_or_nothing(report_md, args.out / "report"):
            write_report(results, report_md, args.out / "report",
                         f"python -m resnet_cifar.report --out {args.out} {' '.join(args.variants)}")
        return
    with all_or_nothing(FIGURES_DIR, REPORT_MD, CURVES_DIR):
        for result in results:
            write_curves(result)
        write_report(results, REPORT_MD, FIGURES_DIR, "dvc repro report")


if __name__ == "__main__":
    run(main)
