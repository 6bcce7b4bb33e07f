"""``edge-slm chat BUNDLE`` without a message: an interactive chat in the terminal.

Answers stream as they are decoded. The conversation keeps its history, and one
:class:`~edge_slm.generation.conversation.Conversation` keeps the KV cache of the
turns it computed, so each turn computes only the new message. Lines starting with
``/`` are commands (:data:`HELP`). Ctrl-C while an answer streams stops that answer
and returns to the prompt; the stopped answer is dropped from the history (it was
not finished, and the model should not build on it). Ctrl-C at the prompt clears the
line; Ctrl-D (end of input) or ``/quit`` leaves with status 0. Line editing and
history (arrow keys) come from ``readline`` where Python has it.

Stdin need not be a terminal: piped lines are read one message each, which makes
the mode scriptable and testable.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from edge_slm.errors import ContextLengthError, EdgeSlmError

HELP = """\
commands:
  /system TEXT   set the system prompt and start a new conversation
  /system        show the system prompt
  /reset         forget the conversation (the system prompt stays)
  /save FILE     write the conversation to FILE as JSON
  /help          show this help
  /quit          leave (or press Ctrl-D)
Ctrl-C stops an answer (the stopped answer is not kept); Ctrl-D leaves."""

PROMPT = "> "
# C0/C1 control characters but tab and newline: a model's output must not drive the terminal
_CONTROLS = {c: None for c in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)]}


def printable(text: str) -> str:
    """``text`` without the control characters a terminal would act on (escapes, bells)."""
    return text.translate(_CONTROLS)


class ChatSession:
    """The state of an interactive chat: system prompt, finished turns, KV cache.

    Args:
        model: a :class:`~edge_slm.TextGenerator`.
        options: generation keywords for every answer (``max_new_tokens``, ...).
        system: the system prompt, or None.
    """

    def __init__(self, model: Any, options: Mapping[str, Any], system: str | None = None) -> None:
        self.model = model
        self.options = dict(options)
        self.system = system
        self.turns: list[dict[str, str]] = []
        factory = getattr(model, "conversation", None)
        # A conversation keeps the KV cache of its own turns; older runtimes kept the
        # last call's cache on the model itself.
        self.conversation: Any = factory() if callable(factory) else model

    def messages(self, user: str | None = None) -> list[dict[str, str]]:
        """The system prompt, the finished turns and ``user``'s new message."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += self.turns
        if user is not None:
            messages.append({"role": "user", "content": user})
        return messages

    def answer(self, user: str) -> Iterator[Any]:
        """Stream the answer to ``user`` (``Chunk`` objects); call :meth:`keep` after."""
        return iter(self.conversation.stream_chat(self.messages(user), **self.options))

    def keep(self, user: str, answer: str) -> None:
        """Add a finished turn to the history."""
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    def reset(self, system: str | None = None, keep_system: bool = True) -> None:
        """Forget the turns (and the cached KV); optionally set a new system prompt."""
        self.turns.clear()
        if not keep_system:
            self.system = system
        reset = getattr(self.conversation, "reset", None) or getattr(
            self.conversation, "reset_cache", None
        )
        if callable(reset):
            reset()

    def to_dict(self, bundle: str) -> dict[str, Any]:
        """The conversation as saved by ``/save``: bundle, time, options and messages."""
        options = {k: v for k, v in self.options.items() if v not in (None, (), 0.0, 0)}
        return {
            "bundle": bundle,
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "options": json.loads(json.dumps(options, default=str)),
            "messages": self.messages(),
        }

    def close(self) -> None:
        """Give the conversation's KV memory back."""
        close = getattr(self.conversation, "close", None)
        if callable(close) and self.conversation is not self.model:
            close()


class _StopFlag:
    """While active, Ctrl-C (SIGINT) sets a flag instead of raising KeyboardInterrupt.

    The streaming loop checks the flag after each piece of text and stops the answer
    cleanly, so the model's state is never left half-updated by an exception.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        self.event.clear()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()

    @property
    def set(self) -> bool:
        return self.event.is_set()


def _enable_line_editing(stdin: TextIO) -> None:
    if stdin.isatty():
        # input() gains line editing and history; Windows and some builds lack it
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401


def _read_line(stdin: TextIO, stdout: TextIO) -> str | None:
    """The next line typed; None at end of input. KeyboardInterrupt propagates.

    The prompt is shown only when stdin is a terminal (piped lines need none).
    """
    prompt = PROMPT if stdin.isatty() else ""
    if stdin is sys.stdin and stdout is sys.stdout:
        try:
            return input(prompt)
        except EOFError:
            return None
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    return line.rstrip("\n") if line else None


def _stream_answer(
    session: ChatSession, user: str, stdout: TextIO, stderr: TextIO
) -> tuple[str, bool]:
    """Print the answer as it streams; returns (text, stopped by Ctrl-C)."""
    pieces: list[str] = []
    reason = None
    with _StopFlag() as stop:
        chunks = session.answer(user)
        try:
            for chunk in chunks:
                stdout.write(printable(chunk.text))
                stdout.flush()
                pieces.append(chunk.text)
                reason = chunk.finish_reason
                if stop.set:
                    break
        finally:
            close = getattr(chunks, "close", None)
            if callable(close):
                close()
        stopped = stop.set and reason is None
    stdout.write("\n")
    stdout.flush()
    if stopped:
        stderr.write("[stopped; this answer is not kept in the conversation]\n")
    elif str(reason) == "length":
        stderr.write("[the answer reached --max-new-tokens and was cut]\n")
    elif str(reason) == "deadline":
        stderr.write("[the answer reached --deadline and was cut]\n")
    stderr.flush()
    return "".join(pieces), stopped


def _command(session: ChatSession, line: str, bundle: str, stdout: TextIO, stderr: TextIO) -> bool:
    """Run a ``/command``; False means leave."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/quit", "/exit", "/bye"):
        return False
    if name == "/help":
        stdout.write(HELP + "\n")
    elif name == "/reset":
        session.reset()
        stderr.write("[conversation cleared]\n")
    elif name == "/system":
        if rest:
            session.reset(system=rest, keep_system=False)
            stderr.write("[system prompt set; new conversation]\n")
        else:
            stdout.write((session.system or "(no system prompt)") + "\n")
    elif name == "/save":
        if not rest:
            stderr.write("usage: /save FILE\n")
        else:
            path = Path(rest).expanduser()
            try:
                path.write_text(
                    json.dumps(session.to_dict(bundle), indent=2, ensure_ascii=False) + "\n",
                    encoding="utf-8",
                )
            except OSError as exc:
                stderr.write(f"cannot save to {str(path)!r}: {exc.strerror or exc}\n")
            else:
                turns = len(session.turns) // 2
                stderr.write(f"[saved {turns} turn{'s' if turns != 1 else ''} to {path}]\n")
    else:
        stderr.write(f"unknown command {name!r}; /help lists them\n")
    stderr.flush()
    stdout.flush()
    return True


def run_chat(
    model: Any,
    options: Mapping[str, Any],
    *,
    system: str | None = None,
    name: str = "",
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The interactive loop; returns the exit status (0 when the user leaves)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    _enable_line_editing(stdin)
    manifest = model.manifest
    stderr.write(
        f"chatting with {name or manifest.model_type} ({manifest.model_type}, "
        f"{manifest.context_length:,}-token context). /help for commands, Ctrl-D to leave.\n"
    )
    stderr.flush()
    session = ChatSession(model, options, system)
    try:
        while True:
            try:
                line = _read_line(stdin, stdout)
            except KeyboardInterrupt:
                stdout.write("\n")
                stderr.write("(Ctrl-D or /quit to leave)\n")
                stderr.flush()
                continue
            if line is None:
                if stdin.isatty():
                    stdout.write("\n")  # end the prompt's line
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not _command(session, text, name, stdout, stderr):
                    return 0
                continue
            try:
                answer, stopped = _stream_answer(session, text, stdout, stderr)
            except EdgeSlmError as exc:
                stdout.write("\n")
                stderr.write(f"edge-slm: error: {exc}\n")
                if isinstance(exc, ContextLengthError):
                    stderr.write("(/reset starts a new conversation)\n")
                stderr.flush()
                continue
            if not stopped:
                session.keep(text, answer)
    finally:
        session.close()
