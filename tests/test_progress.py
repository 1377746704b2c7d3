"""Progress output: live bars on a terminal, one line per stage in a log (issue #7: readable CI logs)."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from export.progress import on_terminal, progress_bar, stage_line


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_are_silent_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert not on_terminal()
    assert list(progress_bar(range(50), enabled=True, desc="epoch 1")) == list(range(50))
    assert log.getvalue() == ""


def test_bars_draw_on_a_terminal_unless_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert on_terminal()
    assert sum(progress_bar(range(5), enabled=True, desc="epoch 1", mininterval=0)) == 10
    assert "epoch 1" in term.getvalue() and "\r" in term.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    list(progress_bar(range(5), enabled=False))
    assert quiet.getvalue() == ""


def test_stage_lines_are_single_lines(capsys: pytest.CaptureFixture[str]) -> None:
    stage_line("build-repo: lenet5 done in 17s")
    stage_line("hidden", enabled=False)
    assert capsys.readouterr().err == "build-repo: lenet5 done in 17s\n"


def test_dataset_generation_logs_without_carriage_returns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.data.make_dataset import main

    assert main(["shapes", "--out", str(tmp_path / "d"), "--classes", "3", "--train-per-class", "4",
                 "--val-per-class", "2", "--size", "32"]) == 0
    out = capsys.readouterr()
    assert "\r" not in out.err and "\r" not in out.out
    assert "wrote 12 train + 6 val images" in out.out + out.err
