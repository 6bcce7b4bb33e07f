"""Talk to `edge-slm serve` with the official OpenAI client: chat, streamed chat, models.

    edge-slm serve bundles/smollm2-135m-instruct-int4-small --port 8080 &
    python examples/openai_client.py --base-url http://127.0.0.1:8080/v1

Any OpenAI client works the same way; this one needs ``pip install openai`` (it is in
the project's ``dev`` extra). With ``--expect TEXT`` the script exits 1 unless the
greedy answer contains TEXT (``make runtime-check`` uses it), after waiting up to
``--wait`` seconds for ``/health`` to say the server is ready.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

from openai import OpenAI


def wait_until_ready(base_url: str, seconds: float) -> None:
    """Poll ``/health`` (200 once the bundles are loaded) until ready or ``seconds`` pass."""
    health = base_url.removesuffix("/v1") + "/health"
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(health, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{health} did not answer 200 within {seconds:.0f} s")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if set")
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--expect", help="exit 1 unless the answer contains this text")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for /health")
    args = parser.parse_args()

    wait_until_ready(args.base_url, args.wait)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": args.question}]
    answer = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=40,  # type: ignore[arg-type]
    )
    text = answer.choices[0].message.content or ""
    print(f"{model}: {text!r} ({answer.usage.completion_tokens if answer.usage else '?'} tokens)")
    print("streamed: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=40,
        stream=True,  # type: ignore[arg-type]
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    if args.expect is not None and args.expect not in text:
        print(f"expected {args.expect!r} in the answer", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
