"""What every stage shares (stage.py): outputs written whole or not at all."""

import pytest

from resnet_cifar.stage import all_or_nothing, atomic_path


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / ".tmp-99999-out.json"
    stale.write_text("left by a killed run")
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"] and target.read_text() == "whole"


def test_all_or_nothing_removes_every_output_of_an_interrupted_stage(tmp_path):
    figures, summary = tmp_path / "figures", tmp_path / "summary.json"
    with pytest.raises(KeyboardInterrupt):
        with all_or_nothing(figures, summary):
            figures.mkdir()
            (figures / "a.png").write_bytes(b"png")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with all_or_nothing(figures, summary):
        summary.write_text("{}")
    assert summary.read_text() == "{}"
