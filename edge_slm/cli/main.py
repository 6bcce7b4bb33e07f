"""The ``edge-slm`` command: thin argument parsing, then one call into the library.

Runtime commands (``generate``, ``chat``, ``classify``, ``embed``, ``bench``, ``perplexity``,
``info``) use edge_slm only. Build commands (``export``, ``quantize``) live in the build
stage, which a device does not install: they are looked up by name only when invoked, so
``edge-slm generate`` never loads torch, and ``edge-slm export`` on a device says which
extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_slm.errors import EdgeSlmError

# subcommand -> module of the build stage providing main(argv, prog)
_BUILD_COMMANDS = {
    "export": ("edge_slm_export.cli", "convert a HF model (hub id, folder or .gguf) to a bundle"),
    "quantize": ("edge_slm_quantize.cli", "make a bundle small (8-bit / 4-bit weight-only)"),
}


def _build_module(name: str) -> Any:
    """Import a build-stage CLI module, or explain how to get it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise SystemExit(
            f"edge-slm: this command needs the build stage ({exc.name} is missing); "
            "install it with: pip install 'edge-slm[build]'"
        ) from None


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle folder")
    parser.add_argument("prompt", help="prompt text (for chat: the user message)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the bundle's")
    parser.add_argument("--temperature", type=float, help="0 = greedy; default: the bundle's")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--typical-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, help="random seed (same seed, same text)")
    parser.add_argument("--deadline", type=float, dest="deadline_s", help="seconds")
    parser.add_argument(
        "--truncate-prompt", action="store_true", help="drop the oldest prompt tokens if too long"
    )
    parser.add_argument(
        "--stop-token-id", type=int, action="append", default=[], dest="stop_token_ids"
    )
    parser.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID=BIAS",
        help="add BIAS to token ID's logit (repeatable; -inf bans it)",
    )
    parser.add_argument("--logprobs", type=int, default=0, help="report N alternatives per token")
    parser.add_argument(
        "--choose",
        action="append",
        default=[],
        metavar="OPTION",
        help="score these answers instead of generating (repeatable): prints a probability each",
    )
    parser.add_argument("--prefix-cache", type=Path, help="a saved prefix cache to start from")
    parser.add_argument("--threads", type=int, help="onnxruntime threads (default: all CPUs)")
    parser.add_argument("--no-cache", action="store_true", help="skip the prepared-session cache")
    parser.add_argument("--system", help="system prompt (chat only)")
    parser.add_argument("--no-stream", action="store_true", help="print the answer at the end")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


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


def _run_generation(args: argparse.Namespace, chat: bool) -> int:
    from edge_slm import TextGenerator, load
    from edge_slm.errors import InvalidArgumentError

    model = load(args.bundle, threads=args.threads, cache=False if args.no_cache else None)
    if not isinstance(model, TextGenerator):
        raise InvalidArgumentError(
            f"bundle {str(args.bundle)!r} is a {model.manifest.task} bundle and cannot "
            "generate; use 'edge-slm classify' or 'edge-slm embed'"
        )
    options = {name: getattr(args, name) for name in _OPTION_FIELDS}
    options["stop"] = tuple(args.stop)
    options["stop_token_ids"] = tuple(args.stop_token_ids)
    options["logit_bias"] = _logit_bias(args.logit_bias)
    if args.prefix_cache:
        model.load_prefix_cache(args.prefix_cache)
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
    print(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="edge-slm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in _BUILD_COMMANDS.items():
        build = sub.add_parser(name, help=help_text, add_help=False)
        build.set_defaults(build_module=module)
    for name, help_text in (("generate", "complete a prompt"), ("chat", "answer one chat message")):
        gen = sub.add_parser(name, help=help_text)
        _add_generation_arguments(gen)
    from edge_slm.cli.encoders import add_encoder_commands

    add_encoder_commands(sub)  # classify, embed
    info = sub.add_parser("info", help="print a bundle's manifest after checking it")
    info.add_argument("bundle", type=Path)
    info.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    bench = sub.add_parser("bench", help="measure load, first-token, tokens/s, memory, bandwidth")
    bench.add_argument("bundle", type=Path)
    bench.add_argument("--prompt-tokens", type=int, default=32)
    bench.add_argument("--new-tokens", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--threads", type=int, help="onnxruntime threads (default: all CPUs)")
    bench.add_argument("--no-spinning", action="store_true", help="idle threads do not spin")
    bench.add_argument("--verify", action="store_true", help="count checksum checks in load")
    bench.add_argument(
        "--no-cache",
        action="store_true",
        help="skip the prepared-session cache (measure a cold load)",
    )
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    ppl = sub.add_parser("perplexity", help="perplexity of a decoder bundle over a UTF-8 text")
    ppl.add_argument("bundle", type=Path)
    ppl.add_argument("text", type=Path, help="UTF-8 text file")
    ppl.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    ppl.add_argument("--max-tokens", type=int, default=4096, help="tokens scored at most")
    ppl.add_argument("--threads", type=int, help="onnxruntime threads (default: all CPUs)")
    return parser


def _run_perplexity(args: argparse.Namespace) -> int:
    from edge_slm.bundle import read_bundle
    from edge_slm.generation.perplexity import bundle_perplexity

    read_bundle(args.bundle)  # checksums first: a bundle is checked before use
    result = bundle_perplexity(
        args.bundle,
        args.text,
        window=args.window,
        max_tokens=args.max_tokens,
        threads=args.threads,
    )
    print(
        json.dumps(
            {"perplexity": result.perplexity, "tokens": result.tokens, "windows": result.windows}
        )
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-slm`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in _BUILD_COMMANDS:
        module = _build_module(_BUILD_COMMANDS[argv[0]][0])
        return int(module.main(argv[1:], prog=f"edge-slm {argv[0]}"))
    args = parser.parse_args(argv)
    try:
        if args.command in ("generate", "chat"):
            return _run_generation(args, chat=args.command == "chat")
        if args.command == "bench":
            return _run_bench(args)
        if args.command == "perplexity":
            return _run_perplexity(args)
        if args.command in ("classify", "embed"):
            from edge_slm.cli.encoders import run_encoder_command

            return run_encoder_command(args)
        return _run_info(args)
    except EdgeSlmError as exc:
        print(f"edge-slm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
