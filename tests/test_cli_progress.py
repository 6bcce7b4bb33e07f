"""The progress module: a bar on a terminal, plain occasional lines in a log or pipe."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from edge_slm.cli.progress import Progress, format_duration, step, track


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    out = FakeTerminal()
    bar = Progress(10, label="scoring", unit="windows", stream=out)
    bar.interval = 0.0  # draw on every update
    for _ in range(5):
        bar.update()
    text = out.getvalue()
    assert text.startswith("\rscoring: [") and " 50%  5/10 windows" in text and "ETA" in text
    bar.close()
    final = out.getvalue().split("\r")[-1]
    assert final.startswith("scoring: 5/10 windows in ")  # summary over the bar
    assert final.rstrip(" \n").endswith("windows/s)") and final.endswith("\n")


def test_quiet_in_a_log() -> None:
    out = io.StringIO()  # not a terminal
    for _ in track(range(1000), label="classifying", unit="texts", stream=out):
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # no redraws: one summary line (another every 10 s)
    assert lines[0].startswith("classifying: 1,000/1,000 texts in 0:00")
    assert "\r" not in out.getvalue()


def test_disabled_draws_nothing() -> None:
    out = FakeTerminal()
    with Progress(3, stream=out, enabled=False) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_durations() -> None:
    assert format_duration(7) == "0:07"
    assert format_duration(723) == "12:03"
    assert format_duration(3723) == "1:02:03"


def test_step_reports_start_and_duration() -> None:
    messages: list[str] = []
    with step(messages.append, "exporting"):
        pass
    assert messages[0] == "… exporting"
    assert messages[1].startswith("✓ exporting (") and messages[1].endswith(" s)")
    with pytest.raises(ValueError), step(messages.append, "failing"):
        raise ValueError
    assert messages[-1] == "… failing"  # no success line for a failed step


def test_perplexity_shows_progress_and_prints_for_people(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_slm.cli.main import main

    text = tmp_path / "t.txt"
    text.write_text("Paris is the capital of France. Once upon a time there lived a fox. " * 6)
    assert main(["perplexity", str(bundles["llama"]), str(text), "--window", "32"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("perplexity ") and "tokens" in captured.out
    assert "scoring: " in captured.err and " windows in " in captured.err
    assert main(["perplexity", str(bundles["llama"]), str(text), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
