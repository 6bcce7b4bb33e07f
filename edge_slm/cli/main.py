"""The ``edge-slm`` command: thin argument parsing, then one call into the library.

Runtime commands (``generate``, ``chat``, ``classify``, ``embed``, ``bench``, ``perplexity``,
``info``, ``doctor``) use edge_slm only. Build commands (``export``, ``quantize``) live in
the build stage, which a device does not install: they are looked up by name only when
invoked, so ``edge-slm generate`` never loads torch, and ``edge-slm export`` on a device
says which extra to install.

Errors a user can cause (a missing bundle, a bad option value, a corrupt file, Ctrl-C)
end in one line on stderr and a non-zero exit status, never a traceback; ``--debug``
shows the traceback too. Help texts are plain text for people: see :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from edge_slm.errors import EdgeSlmError

# subcommand -> module of the build stage providing main(argv, prog)
_BUILD_COMMANDS = {
    "export": ("edge_slm_export.cli", "convert a HF model (hub id, folder or .gguf) to a bundle"),
    "quantize": ("edge_slm_quantize.cli", "make a bundle small (8-bit / 4-bit weight-only)"),
}

EXIT_ERROR = 1  # something failed (a file, the model, a bug)
EXIT_USAGE = 2  # the user asked for something invalid
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

_DESCRIPTION = """\
Run small language model bundles on CPUs and ARM boards: chat, generate, classify,
embed, measure speed and quality, and check a device (doctor). On a workstation with
the build extra, export Hugging Face models to bundles and quantize them."""

_EPILOG = """\
examples:
  edge-slm chat bundles/smollm2-int4                 interactive chat (Ctrl-D to leave)
  edge-slm chat bundles/smollm2-int4 "Hello!"        one answer, for scripts
  edge-slm generate bundles/smollm2-int4 "Once upon a time" --max-new-tokens 64
  edge-slm info bundles/smollm2-int4
  edge-slm doctor bundles/smollm2-int4               can this device run the bundle?

Run 'edge-slm COMMAND --help' for a command's options."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs; shows each option's default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = not (
            default is None or default is False or default is argparse.SUPPRESS or default == []
        )
        if shown and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``edge-slm chat: error: ... (see --help)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _version() -> str:
    from importlib import metadata

    from edge_slm import __version__

    parts = []
    for name in ("onnxruntime", "numpy", "tokenizers"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} missing")
    python = ".".join(str(v) for v in sys.version_info[:3])
    return f"edge-slm {__version__} ({', '.join(parts)}; Python {python})"


def _build_module(name: str) -> Any:
    """Import a build-stage CLI module, or explain how to get it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise SystemExit(
            f"edge-slm: this command needs the build stage ({exc.name} is missing); "
            "install it with: pip install 'edge-slm[build]'"
        ) from None


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--debug``, accepted after the subcommand too."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the Python traceback of an error",
    )


def _add_generation_arguments(parser: argparse.ArgumentParser, chat: bool) -> None:
    parser.add_argument(
        "bundle", type=Path, metavar="BUNDLE", help="bundle folder (a text-generation bundle)"
    )
    if chat:
        parser.add_argument(
            "prompt",
            nargs="?",
            metavar="MESSAGE",
            help="the user message; leave it out for an interactive chat",
        )
        parser.add_argument(
            "--system", metavar="TEXT", help="system prompt: how the model should act"
        )
    else:
        parser.add_argument("prompt", metavar="TEXT", help="the text to continue")
    sampling = parser.add_argument_group("sampling (left out: the bundle's defaults)")
    sampling.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="most tokens to generate per answer"
    )
    sampling.add_argument(
        "--temperature", type=float, metavar="T", help="randomness; 0 always picks the likeliest"
    )
    sampling.add_argument(
        "--top-k", type=int, metavar="K", help="sample among the K likeliest tokens only"
    )
    sampling.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        help="sample among the likeliest tokens whose probabilities add up to P (0-1)",
    )
    sampling.add_argument(
        "--min-p",
        type=float,
        metavar="P",
        help="drop tokens less likely than P times the likeliest one (0-1)",
    )
    sampling.add_argument(
        "--typical-p", type=float, metavar="P", help="locally typical sampling mass (0-1)"
    )
    sampling.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="X",
        help="divide the score of tokens already seen by X (1 = off; 1.1 is mild)",
    )
    sampling.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        metavar="X",
        help="lower a token's score by X for each time it appeared",
    )
    sampling.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        metavar="X",
        help="lower a token's score by X once it appeared",
    )
    sampling.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        metavar="N",
        help="never repeat a sequence of N tokens (0 = off)",
    )
    sampling.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    sampling.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID=BIAS",
        help="add BIAS to token ID's score; -inf bans the token (repeatable)",
    )
    stopping = parser.add_argument_group("stopping")
    stopping.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when the answer contains TEXT, which is not printed (repeatable)",
    )
    stopping.add_argument(
        "--stop-token-id",
        type=int,
        action="append",
        default=[],
        dest="stop_token_ids",
        metavar="ID",
        help="stop at this token id, besides the bundle's end tokens (repeatable)",
    )
    stopping.add_argument(
        "--deadline",
        type=float,
        dest="deadline_s",
        metavar="SECONDS",
        help="stop generating after this many seconds",
    )
    stopping.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="drop the oldest prompt tokens when the prompt is too long for the context",
    )
    speed = parser.add_argument_group("speed")
    speed.add_argument(
        "--speculative",
        choices=("prompt-lookup",),
        help="draft tokens by looking the last words up in the prompt and answer, verify "
        "them in one step: faster answers that quote the prompt (off by default)",
    )
    speed.add_argument(
        "--speculative-tokens",
        type=int,
        default=4,
        metavar="K",
        help="with --speculative: at most K drafted tokens per step",
    )
    speed.add_argument(
        "--speculative-ngram",
        type=int,
        default=3,
        metavar="N",
        help="with --speculative: look up the last N tokens (then shorter, down to 2)",
    )
    structured = parser.add_argument_group(
        "structured output (needs edge-slm[structured]; docs/structured-output.md)"
    ).add_mutually_exclusive_group()
    structured.add_argument(
        "--json-schema", metavar="FILE", help="the answer is JSON valid against this schema file"
    )
    structured.add_argument(
        "--json-object", action="store_true", help="the answer is one JSON object"
    )
    structured.add_argument(
        "--regex", metavar="PATTERN", help="the whole answer matches PATTERN (Rust regex syntax)"
    )
    structured.add_argument(
        "--grammar", metavar="FILE", help="the answer is a sentence of this Lark or GBNF grammar"
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--no-stream", action="store_true", help="print the answer at the end, not as it comes"
    )
    out.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON object (text, token ids, finish reason, timings)",
    )
    out.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="N",
        help="with --json: each token's log-probability and its N likeliest alternatives",
    )
    out.add_argument(
        "--choose",
        action="append",
        default=[],
        metavar="OPTION",
        help="instead of generating, score these answers and print a probability for each "
        "(repeatable)",
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--prefix-cache",
        type=Path,
        metavar="FILE",
        help="start from a saved prefix cache (a long fixed prompt computed once)",
    )
    engine.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads to use (default: every usable CPU)"
    )
    engine.add_argument(
        "--no-cache",
        action="store_true",
        help="do not use or write the prepared-session cache (slower load)",
    )
    add_common_arguments(parser)


_OPTION_FIELDS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "no_repeat_ngram_size",
    "seed",
    "deadline_s",
    "truncate_prompt",
    "logprobs",
    "speculative",
    "speculative_tokens",
    "speculative_ngram",
)


def _logit_bias(items: Sequence[str]) -> dict[int, float] | None:
    """Parse ``ID=BIAS`` pairs."""
    from edge_slm.errors import InvalidArgumentError

    bias = {}
    for item in items:
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise InvalidArgumentError(
                f"--logit-bias takes ID=BIAS (e.g. 42=-inf), got {item!r}"
            ) from None
        if not sep:
            raise InvalidArgumentError(f"--logit-bias takes ID=BIAS, got {item!r}")
    return bias or None


def _result_json(result: Any) -> str:
    t = result.timings
    data = {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": str(result.finish_reason),
        "stop": result.stop,
        "timings": {
            "load_s": t.load_s,
            "time_to_first_token_s": t.time_to_first_token_s,
            "prompt_tokens": t.prompt_tokens,
            "reused_prompt_tokens": t.reused_prompt_tokens,
            "prompt_tokens_per_s": t.prompt_tokens_per_s,
            "generated_tokens": t.generated_tokens,
            "decode_tokens_per_s": t.decode_tokens_per_s,
        },
    }
    if result.logprobs:
        data["logprobs"] = [
            {
                "token_id": s.token_id,
                "logprob": s.logprob,
                "top": [[alt.token_id, alt.logprob] for alt in s.top_logprobs],
            }
            for s in result.logprobs
        ]
    return json.dumps(data, ensure_ascii=False)


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling and stopping options given on the command line, as keywords."""
    options = {name: getattr(args, name) for name in _OPTION_FIELDS}
    options["stop"] = tuple(args.stop)
    options["stop_token_ids"] = tuple(args.stop_token_ids)
    options["logit_bias"] = _logit_bias(args.logit_bias)
    options["constraint"] = _constraint(args)
    return options


def _constraint(args: argparse.Namespace) -> Any:
    """--json-schema / --json-object / --regex / --grammar as a constraint (None: none)."""
    from edge_slm.errors import InvalidArgumentError
    from edge_slm.generation.constraints import Grammar, JsonSchema, Regex

    def read(path: str, what: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise InvalidArgumentError(f"cannot read the {what} file {path!r}: {error}") from None

    if getattr(args, "json_schema", None):
        return JsonSchema(read(args.json_schema, "JSON schema"))
    if getattr(args, "json_object", False):
        return JsonSchema()
    if getattr(args, "regex", None):
        return Regex(args.regex)
    if getattr(args, "grammar", None):
        return Grammar(read(args.grammar, "grammar"))
    return None


def _run_generation(args: argparse.Namespace, chat: bool) -> int:
    from edge_slm import TextGenerator, load
    from edge_slm.errors import InvalidArgumentError

    interactive = chat and args.prompt is None
    if interactive and (args.json or args.choose or args.no_stream):
        raise InvalidArgumentError(
            "--json, --choose and --no-stream need a message (edge-slm chat BUNDLE MESSAGE)"
        )
    options = generation_options(args)
    model = load(args.bundle, threads=args.threads, cache=False if args.no_cache else None)
    if not isinstance(model, TextGenerator):
        raise InvalidArgumentError(
            f"bundle {str(args.bundle)!r} is a {model.manifest.task} bundle and cannot "
            "generate; use 'edge-slm classify' or 'edge-slm embed'"
        )
    if args.prefix_cache:
        model.load_prefix_cache(args.prefix_cache)
    if interactive:
        from edge_slm.cli.chat import run_chat

        return run_chat(model, options, system=args.system, name=str(args.bundle))
    prompt = args.prompt
    if chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        prompt = model.render_chat(messages)
    if args.choose:
        scores = model.choose(prompt, args.choose)
        for option, probability in scores:
            print(json.dumps({"option": option, "probability": probability}, ensure_ascii=False))
        return 0
    if args.json or args.no_stream:
        result = model.chat(messages, **options) if chat else model.generate(prompt, **options)
        print(_result_json(result) if args.json else result.text)
        return 0
    chunks = model.stream_chat(messages, **options) if chat else model.stream(prompt, **options)
    reason = None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        reason = chunk.finish_reason
    sys.stdout.write("\n")
    print(f"[finish: {reason}]", file=sys.stderr)
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from edge_slm.bundle import read_bundle

    manifest = read_bundle(args.bundle, verify=not args.no_verify)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_info(args.bundle, manifest, verified=not args.no_verify))
    return 0


def _mib(size: float) -> str:
    return f"{size / (1 << 20):,.1f} MiB"


def format_info(folder: Path, manifest: Any, verified: bool) -> str:
    """A bundle's manifest as a few aligned lines for people."""
    from edge_slm.engine.device import kv_bytes_per_token

    rows: list[tuple[str, str]] = [
        ("bundle", str(folder)),
        ("task", manifest.task),
        ("model", f"{manifest.model_type} ({manifest.architecture})"),
        ("context", f"{manifest.context_length:,} tokens"),
        ("vocabulary", f"{manifest.vocab_size:,} tokens"),
    ]
    decoder = manifest.decoder
    if decoder is not None:
        kv = kv_bytes_per_token(manifest)
        rows.append(
            (
                "decoder",
                f"{decoder.num_layers} layers, {decoder.num_kv_heads} KV heads x "
                f"{decoder.head_dim}, {decoder.layout} graph",
            )
        )
        rows.append(
            (
                "KV cache",
                f"{kv / 1024:,.1f} KiB per token, {_mib(kv * manifest.context_length)} "
                "at full context",
            )
        )
        rows.append(("chat template", "yes" if manifest.chat_template else "no"))
    if manifest.labels:
        shown = ", ".join(manifest.labels[:8]) + (", ..." if len(manifest.labels) > 8 else "")
        rows.append(("labels", f"{len(manifest.labels)}: {shown}"))
    q = manifest.quantization
    quant = q.method if q.method != "none" else "none (float32)"
    if q.bits:
        quant += f", {q.bits}-bit" + (f", blocks of {q.block_size}" if q.block_size else "")
    rows.append(("quantization", quant))
    if q.perplexity_before is not None and q.perplexity_after is not None:
        rows.append(("perplexity", f"{q.perplexity_before:.2f} -> {q.perplexity_after:.2f}"))
    if q.accuracy_before is not None and q.accuracy_after is not None:
        rows.append(
            ("accuracy", f"{100 * q.accuracy_before:.2f}% -> {100 * q.accuracy_after:.2f}%")
        )
    if manifest.validation is not None:
        v = manifest.validation
        rows.append(
            (
                "validated",
                f"max logit difference {v.max_abs_logit_diff:.2g} (tolerance {v.tolerance:g}) "
                f"on {v.prompts} prompts",
            )
        )
    p = manifest.provenance
    rows.append(("source", f"{p.source} ({p.source_kind})"))
    if p.created_at:
        rows.append(("created", p.created_at))
    for role, name in manifest.files.items():
        path = Path(folder) / name
        size = _mib(path.stat().st_size) if path.is_file() else "missing"
        rows.append((f"file: {role}", f"{name} ({size})"))
    rows.append(("checksums", "ok" if verified else "not checked (--no-verify)"))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def build_parser() -> ArgumentParser:
    """The argument parser of every subcommand."""
    parser = ArgumentParser(prog="edge-slm", description=_DESCRIPTION, epilog=_EPILOG)
    parser.add_argument("--version", action="version", version=_version(), help="show the version")
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in _BUILD_COMMANDS.items():
        build = sub.add_parser(name, help=help_text + " (needs the build extra)", add_help=False)
        build.set_defaults(build_module=module)
    # edge_slm/cli/serve.py parses its own options (dispatched before this parser runs)
    sub.add_parser("serve", help="serve bundles over an OpenAI-compatible HTTP API", add_help=False)
    gen = sub.add_parser(
        "generate",
        help="continue a text",
        description="Continue a text with a text-generation bundle; the answer streams to "
        "stdout as it is generated.",
    )
    _add_generation_arguments(gen, chat=False)
    chat = sub.add_parser(
        "chat",
        help="chat with a model: interactive, or one answer for scripts",
        description="Chat with a text-generation bundle, in its chat template.\n\n"
        "Without MESSAGE: an interactive chat. Answers stream as they come; earlier turns\n"
        "are kept (and not recomputed). Commands: /system TEXT, /reset, /save FILE, /help.\n"
        "Ctrl-C stops the current answer, Ctrl-D leaves.\n\n"
        "With MESSAGE: one answer on stdout, then exit (for scripts).",
    )
    _add_generation_arguments(chat, chat=True)
    from edge_slm.cli.encoders import add_encoder_commands

    for cmd in add_encoder_commands(sub):  # classify, embed, ner
        add_common_arguments(cmd)
    from edge_slm.cli.train import add_train_command

    add_common_arguments(add_train_command(sub))
    info = sub.add_parser(
        "info",
        help="show what a bundle is (model, context, quantization, files)",
        description="Check a bundle's files against their checksums and describe it.",
    )
    info.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle folder")
    info.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    add_common_arguments(info)
    bench = sub.add_parser(
        "bench",
        help="measure load time, first token, tokens/s, memory and bandwidth",
        description="Measure how fast a text-generation bundle runs on this machine: load "
        "time, time to first token, prompt and decode tokens/s (greedy, synthetic prompt), "
        "peak memory, and the memory bandwidth decoding achieves against a measured bound.",
    )
    bench.add_argument(
        "bundle", type=Path, metavar="BUNDLE", help="bundle folder (a text-generation bundle)"
    )
    bench.add_argument(
        "--prompt-tokens", type=int, default=32, metavar="N", help="length of the prompt"
    )
    bench.add_argument(
        "--new-tokens", type=int, default=64, metavar="N", help="tokens decoded per run"
    )
    bench.add_argument("--repeats", type=int, default=3, metavar="N", help="measured runs (median)")
    bench.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads to use (default: every usable CPU)"
    )
    bench.add_argument("--no-spinning", action="store_true", help="idle threads sleep, not spin")
    bench.add_argument(
        "--verify", action="store_true", help="include the checksum check in the load time"
    )
    bench.add_argument(
        "--no-cache",
        action="store_true",
        help="skip the prepared-session cache (measure a cold load)",
    )
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    add_common_arguments(bench)
    ppl = sub.add_parser(
        "perplexity",
        help="measure a bundle's quality on your own text (lower is better)",
        description="Perplexity of a text-generation bundle over a UTF-8 text file: how "
        "surprised the model is by the text (lower is better). Compare bundles on the same "
        "text and settings.",
    )
    ppl.add_argument(
        "bundle", type=Path, metavar="BUNDLE", help="bundle folder (a text-generation bundle)"
    )
    ppl.add_argument("text", type=Path, metavar="TEXT_FILE", help="UTF-8 text file to score")
    ppl.add_argument(
        "--window",
        type=int,
        default=512,
        metavar="N",
        help="tokens per window, at most the context length",
    )
    ppl.add_argument(
        "--max-tokens", type=int, default=4096, metavar="N", help="score at most N tokens"
    )
    ppl.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads to use (default: every usable CPU)"
    )
    ppl.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ppl.add_argument(
        "--json",
        action="store_true",
        help="print perplexity, tokens and windows as JSON",
    )
    add_common_arguments(ppl)
    from edge_slm.cli.doctor import add_doctor_parser

    add_common_arguments(add_doctor_parser(sub))
    from edge_slm.cli.batch import add_batch_parser

    add_common_arguments(add_batch_parser(sub))
    return parser


class _CountingDecoder:
    """A decoder whose ``all_logits`` calls (one per window) advance a progress bar."""

    def __init__(self, model: Any, bar: Any) -> None:
        self.model, self.bar = model, bar

    def all_logits(self, ids: Any) -> Any:
        logits = self.model.all_logits(ids)
        self.bar.update()
        return logits

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _run_perplexity(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from edge_slm.bundle import read_bundle
    from edge_slm.cli.progress import Progress
    from edge_slm.engine.session import LoadOptions
    from edge_slm.errors import InvalidArgumentError
    from edge_slm.generation import perplexity as ppl
    from edge_slm.generation.decoders import open_decoder

    manifest = read_bundle(args.bundle)  # checksums first: a bundle is checked before use
    if manifest.decoder is None:
        raise InvalidArgumentError(
            f"bundle {str(args.bundle)!r} is a {manifest.task} bundle, not a decoder"
        )
    tokenizer = Tokenizer.from_file(str(args.bundle / manifest.files["tokenizer"]))
    ids = ppl.encode_text(tokenizer, ppl.read_text(args.text), args.max_tokens)
    window = ppl.effective_window(manifest, args.window)
    bos = ppl.bos_for_scoring(manifest)
    count = len(ppl.token_windows(ids, window, bos))
    model = open_decoder(
        args.bundle / manifest.files["model"], manifest.decoder, LoadOptions(threads=args.threads)
    )
    with Progress(count, label="scoring", unit="windows", enabled=not args.no_progress) as bar:
        counting = cast(Any, _CountingDecoder(model, bar))
        result = ppl.perplexity(counting, ids, window=window, bos_token_id=bos)
    if args.json:
        data = {"perplexity": result.perplexity, "tokens": result.tokens, "windows": result.windows}
        print(json.dumps(data))
    else:
        print(
            f"perplexity {result.perplexity:.3f} over {result.tokens:,} tokens "
            f"({result.windows} window{'s' if result.windows != 1 else ''} of up to {window})"
        )
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from edge_slm.cli.bench import format_result, run_bench

    result = run_bench(
        args.bundle,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        threads=args.threads,
        spinning=False if args.no_spinning else None,
        verify=args.verify,
        cache=False if args.no_cache else None,
    )
    print(json.dumps(result.to_dict()) if args.json else format_result(result))
    return 0


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] in _BUILD_COMMANDS and argv[:first] in ([], ["--debug"]):
        command = argv[first]
        module = _build_module(_BUILD_COMMANDS[command][0])
        return int(module.main(argv[first + 1 :], prog=f"edge-slm {command}"))
    if first is not None and argv[first] == "serve":  # cli/serve.py (add_serve_parser, run_serve)
        from edge_slm.cli.serve import main as serve_main

        return serve_main(argv[first + 1 :], prog="edge-slm serve")
    args = parser.parse_args(argv)
    if args.command in ("generate", "chat"):
        return _run_generation(args, chat=args.command == "chat")
    if args.command == "bench":
        return _run_bench(args)
    if args.command == "perplexity":
        return _run_perplexity(args)
    if args.command in ("classify", "embed", "ner"):
        from edge_slm.cli.encoders import run_encoder_command

        return run_encoder_command(args)
    if args.command == "train":
        from edge_slm.cli.train import run_train

        return run_train(args)
    if args.command == "batch":
        from edge_slm.cli.batch import run_batch

        return run_batch(args)
    if args.command == "doctor":
        from edge_slm.cli.doctor import run_doctor

        return run_doctor(args)
    return _run_info(args)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    print(f"edge-slm: warning: {message}", file=sys.stderr)


def _fail(message: str, debug: bool, code: int) -> int:
    if debug:
        traceback.print_exc()
    print(f"edge-slm: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-slm`` console script; returns the exit status.

    0: done; 1: something failed; 2: invalid input (a bad option, bundle or file);
    130: interrupted (Ctrl-C).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _show_warning
            return _dispatch(argv)
    except KeyboardInterrupt:
        return _fail("interrupted", debug, EXIT_INTERRUPTED)
    except EdgeSlmError as exc:
        return _fail(f"error: {exc}", debug, EXIT_USAGE)
    except BrokenPipeError:
        # stdout was closed early (e.g. piped into head): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(f"error: {exc.strerror or exc}{where}", debug, EXIT_ERROR)
    except MemoryError:
        return _fail("error: out of memory", debug, EXIT_ERROR)
    except Exception as exc:
        hint = "" if debug else " (run with --debug for the traceback)"
        return _fail(f"error: {type(exc).__name__}: {exc}{hint}", debug, EXIT_ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
