"""The README and docs show the committed results: their generated tables are the committed files'."""

import re
from pathlib import Path

import pytest

from resnet_cifar.ablation import TUNING_MD, markers
from resnet_cifar.paths import ABLATION_MD, REPORT_MD
from resnet_cifar.readme import RESULTS_MARKERS, results_table, write_section
from resnet_cifar.stage import StageError

PROJECT = Path(__file__).resolve().parents[1]


def between(text: str, markers: tuple[str, str]) -> str:
    start, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
    return text[start:end].strip("\n")


def test_the_readmes_results_table_is_the_committed_reports():
    shown = between((PROJECT / "README.md").read_text(), RESULTS_MARKERS)
    assert shown == results_table(PROJECT / REPORT_MD), "run `python -m resnet_cifar.readme`"
    assert shown.count("\n") >= 2  # a header, its rule and at least one variant


def test_the_tuning_notes_ablation_tables_are_the_committed_ones():
    notes, tables = (PROJECT / TUNING_MD).read_text(), (PROJECT / ABLATION_MD).read_text()
    variants = re.findall(r"<!-- ablation of (\S+): generated", notes)
    assert variants == re.findall(r"<!-- ablation of (\S+): generated", tables) and "tuned" in variants
    for variant in variants:
        shown = between(notes, markers(variant))
        assert shown == between(tables, markers(variant)), f"run `python -m resnet_cifar.ablation --variant {variant}`"
        assert "validation split of 0.1" in shown  # measured on a validation split, not on the test set


def test_a_section_is_replaced_whole_and_missing_markers_are_named(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{RESULTS_MARKERS[0]}\nold\nrows\n{RESULTS_MARKERS[1]}\nafter\n")
    write_section(RESULTS_MARKERS, "| new |\n", readme)
    assert readme.read_text() == f"# title\n{RESULTS_MARKERS[0]}\n| new |\n{RESULTS_MARKERS[1]}\nafter\n"
    readme.write_text("# no markers\n")
    with pytest.raises(StageError, match=rf"{readme}: the markers .* are missing"):
        write_section(RESULTS_MARKERS, "| new |\n", readme)
