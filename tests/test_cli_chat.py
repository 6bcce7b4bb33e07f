"""``edge-slm chat BUNDLE`` interactive: the real command in a subprocess on a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")

# The real command (edge_slm.cli.main.main) with each streamed piece slowed down, so a
# Ctrl-C reliably lands in the middle of an answer of the tiny (very fast) model.
_DRIVER = """
import sys, time
from edge_slm.generation import model as model_module
from edge_slm.cli.main import main

slow = float(sys.argv[1])

def slowed(stream):
    def wrapper(self, *args, **kwargs):
        for chunk in stream(self, *args, **kwargs):
            time.sleep(slow)
            yield chunk
    return wrapper

try:
    from edge_slm.generation import conversation as conversation_module
    conversation_module.Conversation.stream_chat = slowed(
        conversation_module.Conversation.stream_chat
    )
except ImportError:
    pass
model_module.TextGenerator.stream_chat = slowed(model_module.TextGenerator.stream_chat)
raise SystemExit(main(sys.argv[2:]))
"""


class Terminal:
    """A child process on a pseudo-terminal: send keys, wait for text."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, close_fds=True
        )
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 30.0) -> str:
        """Read until ``text`` appears in the output since the last expect; return that output."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} did not appear; output so far: {self.seen!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"{text!r} did not appear before exit: {self.seen!r}")
                self.seen += data.decode("utf-8", "replace").replace("\r\n", "\n")
        before, _, after = self.seen.partition(text)
        self.seen = after
        return before

    def wait_for_output(self, timeout: float = 30.0) -> None:
        """Wait until the child writes something new (kept for the next expect)."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        assert ready, f"no output within {timeout} s; output so far: {self.seen!r}"
        self.seen += os.read(self.master, 4096).decode("utf-8", "replace").replace("\r\n", "\n")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait_for_key_read(self, timeout: float = 30.0) -> None:
        """Wait until the child sleeps in poll(): readline waiting for a key (Linux
        /proc; elsewhere a fixed pause). A key or signal sent earlier may be swallowed by
        the terminal's line mode or seen late on a busy machine."""
        wchan = Path(f"/proc/{self.proc.pid}/wchan")
        if not wchan.exists():
            time.sleep(0.3)
            return
        deadline = time.monotonic() + timeout
        while "poll" not in wchan.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


MAX_NEW_TOKENS = 10  # three short turns fit in the tiny model's 128-token context


@pytest.fixture()
def terminal(
    bundles: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Terminal]:
    """The chat on a terminal; an indirect parameter slows each piece by that many seconds."""
    delay = str(getattr(request, "param", 0))
    args = [sys.executable, "-c", _DRIVER, delay, "chat", str(bundles["qwen2"])]
    term = Terminal([*args, "--max-new-tokens", str(MAX_NEW_TOKENS), "--seed", "1"], tmp_path)
    yield term
    term.close()


def _saved(path: Path) -> list[dict[str, str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["options"]["max_new_tokens"] == MAX_NEW_TOKENS
    return list(data["messages"])


def test_interactive_chat_streams_and_keeps_history(terminal: Terminal, tmp_path: Path) -> None:
    terminal.expect("/help for commands")
    terminal.expect("> ")
    terminal.send("Hello there\n")
    answer = terminal.expect("\n> ").split("Hello there\n", 1)[-1]
    assert answer.strip()  # text streamed before the next prompt
    terminal.send("And then?\n")
    terminal.expect("\n> ")
    terminal.send("/save first.json\n")
    terminal.expect("[saved 2 turns")
    messages = _saved(tmp_path / "first.json")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Hello there" and messages[2]["content"] == "And then?"

    terminal.send("/system You are the station's help desk.\n")
    terminal.expect("[system prompt set")
    terminal.send("/system\n")
    terminal.expect("You are the station's help desk.")
    terminal.send("Where is platform 4?\n")
    terminal.expect("\n> ")
    terminal.send("/save second.json\n")
    terminal.expect("[saved 1 turn ")
    messages = _saved(tmp_path / "second.json")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "You are the station's help desk."

    terminal.send("/reset\n")
    terminal.expect("[conversation cleared]")
    terminal.send("/save third.json\n")
    terminal.expect("[saved 0 turns")
    assert [m["role"] for m in _saved(tmp_path / "third.json")] == ["system"]

    terminal.send("/help\n")
    terminal.expect("/save FILE")
    terminal.send("/nonsense\n")
    terminal.expect("unknown command")

    # Ctrl-D at the prompt leaves. Sent only once readline waits for a key: typed before,
    # the terminal (still in line mode) may swallow it on a busy machine.
    terminal.expect("> ")
    terminal.wait_for_key_read()
    terminal.send("\x04")
    assert terminal.proc.wait(timeout=30) == 0


# 0.2 s per piece: an answer takes about 2 s, so a Ctrl-C sent after 0.5 s lands in it
@pytest.mark.parametrize("terminal", [0.2], indirect=True)
def test_ctrl_c_stops_the_answer_not_the_program(terminal: Terminal, tmp_path: Path) -> None:
    terminal.expect("> ")
    terminal.send("Tell me a long story\n")
    terminal.expect(
        "Tell me a long story\n"
    )  # the terminal's echo: the chat may not have read it yet
    terminal.wait_for_output()  # the answer's first piece: the chat is streaming, more to come
    terminal.proc.send_signal(signal.SIGINT)
    terminal.expect("[stopped; this answer is not kept")
    terminal.expect("> ")
    assert terminal.proc.poll() is None  # still running
    terminal.send("/save after.json\n")
    terminal.expect("[saved 0 turns")
    assert _saved(tmp_path / "after.json") == []
    # Ctrl-C at the prompt does not leave either; the next answer works.
    terminal.expect("> ")
    terminal.wait_for_key_read()  # a signal just before readline waits is seen late
    terminal.proc.send_signal(signal.SIGINT)
    terminal.expect("Ctrl-D or /quit to leave")
    terminal.send("Hello\n")
    terminal.expect("\n> ")
    terminal.send("/save again.json\n")
    terminal.expect("[saved 1 turn ")
    terminal.send("/quit\n")
    assert terminal.proc.wait(timeout=30) == 0


def test_piped_lines_are_messages(bundles: dict[str, Path], tmp_path: Path) -> None:
    lines = "Hello\n/save out.json\n"
    done = subprocess.run(
        [sys.executable, "-m", "edge_slm", "chat", str(bundles["qwen2"]), "--max-new-tokens", "4"],
        input=lines,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "> " not in done.stdout  # no prompts for a pipe
    messages = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]


def test_interactive_only_options_are_refused(
    bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_slm.cli.main import main

    assert main(["chat", str(bundles["qwen2"]), "--json"]) == 2
    assert "need a message" in capsys.readouterr().err


def test_printable_drops_terminal_controls() -> None:
    from edge_slm.cli.chat import printable

    assert printable("a\x1b[2Jb\x07c\td\né") == "a[2Jbc\td\né"
