"""Help texts for people, --version, and errors without tracebacks."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edge_slm
from edge_slm.cli.main import build_parser, main

MARKUP = re.compile(r"``|:(func|mod|class|meth|attr|data|exc|ref):`")
RUNTIME_COMMANDS = [
    "generate",
    "chat",
    "classify",
    "embed",
    "info",
    "bench",
    "perplexity",
    "doctor",
]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("command", ["", *RUNTIME_COMMANDS])
def test_help_is_plain_text_and_explains_every_option(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert not MARKUP.search(text), MARKUP.search(text)
    parser = build_parser()
    target = _subparsers(parser)[command] if command else parser
    for action in target._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest}: no help text"
        for option in action.option_strings:
            assert option in text


def test_defaults_are_shown(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in text and "(default: 32)" in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: 0.0)" in " ".join(capsys.readouterr().out.split())


def test_every_runtime_command_is_listed() -> None:
    assert set(RUNTIME_COMMANDS) <= set(_subparsers(build_parser()))


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"edge-slm {edge_slm.__version__} (onnxruntime ")


def _run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_slm", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_user_errors_are_one_line(bundles: dict[str, Path], tmp_path: Path) -> None:
    line = _one_line_error(_run("info", str(tmp_path / "no-such-bundle")))
    assert "does not exist" in line or "no manifest" in line
    done = _run("chat", str(bundles["qwen2"]), "Hi", "--temperature", "warm")
    assert done.returncode == 2
    assert "--temperature" in _one_line_error(done)
    done = _run("generate", str(bundles["qwen2"]), "Hi", "--top-p", "2")
    assert done.returncode == 2 and "top_p" in _one_line_error(done)
    assert "invalid choice" in _one_line_error(_run("frobnicate"))

    # A corrupt bundle: a modified graph fails its checksum, a broken manifest its parse.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundles["qwen2"], corrupt)
    with open(corrupt / "model.onnx", "r+b") as graph:
        graph.seek(100)
        graph.write(b"\xff" * 16)
    assert "sha256" in _one_line_error(_run("generate", str(corrupt), "Hi")).lower()
    (corrupt / "manifest.json").write_text("{not json", encoding="utf-8")
    _one_line_error(_run("info", str(corrupt)))

    # --debug shows the traceback as well.
    done = _run("--debug", "info", str(corrupt))
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_unexpected_errors_are_one_line_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = importlib.import_module("edge_slm.cli.main")

    def boom(argv: list[str]) -> int:
        raise RuntimeError("onnxruntime said no")

    monkeypatch.setattr(cli, "_dispatch", boom)
    assert cli.main(["info", "x"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "edge-slm: error: RuntimeError: onnxruntime said no (run with --debug for the traceback)"
    )

    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert cli.main(["info", "x"]) == 130
    assert capsys.readouterr().err == "edge-slm: interrupted\n"


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="needs Linux /proc")
def test_ctrl_c_exits_130_with_one_line(bundles: dict[str, Path]) -> None:
    # perplexity reads its text from a pipe that stays open: the process waits there.
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_slm", "perplexity", str(bundles["qwen2"]), "/dev/stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        wchan = Path(f"/proc/{proc.pid}/wchan")
        while "pipe" not in wchan.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        # stdin stays open until the process ended: closing it (communicate does) could
        # let a starved process read end-of-file before it handles the signal
        proc.wait(timeout=30)
        assert proc.stderr is not None and proc.stdin is not None
        err = proc.stderr.read()
        proc.stdin.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err == "edge-slm: interrupted\n"


def test_build_commands_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    cli = importlib.import_module("edge_slm.cli.main")

    monkeypatch.setitem(cli._BUILD_COMMANDS, "export", ("edge_slm_no_such_module.cli", "x"))
    with pytest.raises(SystemExit, match=r"pip install 'edge-slm\[build\]'"):
        cli.main(["export", "a", "b"])


def test_pipe_closed_early_is_quiet(bundles: dict[str, Path]) -> None:
    # `edge-slm info ... | head -1`: no BrokenPipeError traceback.
    if os.name != "posix":
        pytest.skip("POSIX pipes")
    done = subprocess.run(
        f"{sys.executable} -m edge_slm info {bundles['qwen2']} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.startswith("bundle")
    assert "Traceback" not in done.stderr
