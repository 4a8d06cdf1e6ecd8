"""The pull-request comment: this branch's results against a base revision, as Markdown.

    python -m resnet_cifar.pr_comment [BASE]      (BASE defaults to main)

Leads with one table, each variant's test accuracy and train time on BASE and on this branch,
then the full `dvc metrics diff` and `dvc params diff` in collapsed blocks.
"""

import json
import re
import subprocess
import sys

from resnet_cifar.paths import evaluate_path
from resnet_cifar.stage import StageError, run

VARIANT = re.compile(r"metrics/variants/([^/]+)/evaluate\.json")


def dvc(*args: str) -> str:
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise StageError(f"dvc {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def _accuracy(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _minutes(value) -> str:
    return "-" if value is None else f"{value / 60:.1f} min"


def summary_table(diff: dict, base: str) -> list[str]:
    """One row per variant found in either revision's metrics."""
    rows = [f"| variant | test acc (`{base}`) | test acc (branch) | change | train time (`{base}`) "
            "| train time (branch) |", "|---|---:|---:|---:|---:|---:|"]
    variants = sorted({m[1] for path in diff if (m := VARIANT.fullmatch(path))})
    for variant in variants:
        evaluation = diff.get(str(evaluate_path(variant)), {})
        accuracy, seconds = evaluation.get("test.accuracy", {}), evaluation.get("train_time.train_seconds", {})
        old, new = accuracy.get("old"), accuracy.get("new")
        change = f"{(new - old) * 100:+.2f} points" if old is not None and new is not None else "new" if old is None else "removed"
        rows.append(f"| {variant} | {_accuracy(old)} | {_accuracy(new)} | {change} "
                    f"| {_minutes(seconds.get('old'))} | {_minutes(seconds.get('new'))} |")
    return rows


def details(summary: str, body: str) -> list[str]:
    return [f"<details><summary>{summary}</summary>", "", body.strip() or "No changes.", "", "</details>"]


def comment(base: str) -> str:
    diff = json.loads(dvc("metrics", "diff", base, "--all", "--json") or "{}")
    lines = [f"## Results: this branch vs `{base}`", "", *summary_table(diff, base), "",
             *details("All metrics (<code>dvc metrics diff</code>)", dvc("metrics", "diff", base, "--md")), "",
             *details("Params (<code>dvc params diff</code>)", dvc("params", "diff", base, "--md"))]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise StageError("usage: python -m resnet_cifar.pr_comment [BASE]")
    sys.stdout.write(comment(argv[0] if argv else "main"))


if __name__ == "__main__":
    run(main)
