"""What the device computes: run with the runtime only (numpy, onnxruntime, tokenizers).

    python check_device.py BUNDLES OUT.json [--device] [--no-smollm2]

``tests/arm64/run.py`` (``make test-arm64``) runs this script twice on the same bundles:
on the x86 host (the expected outputs) and inside the emulated arm64 Debian bookworm
(``--device``), then compares the two JSON files. The checks that need no reference
(refusals, stop strings, the server agreeing with the library, no build stage imported)
are asserted here, on both sides. The file name keeps pytest from collecting it.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import edge_slm

DECODERS = ("fused-fp32", "fused-int4", "optimum-fp32", "optimum-int4")
PROMPT = "The quick brown"
MESSAGES = [
    {"role": "system", "content": "You are a kiosk."},
    {"role": "user", "content": "Where is Paris?"},
]
TEXTS = ["Paris is the capital of France.", "Terrible.", "please reset my password"]
QUESTION = "What is the capital of France?"  # examples/demo.py's question
BUILD_STAGE = ("torch", "transformers", "optimum", "onnx", "edge_slm_export", "edge_slm_quantize")


def steps(result: Any) -> list[dict[str, Any]]:
    """Each generated token: its id, log-probability and the top two alternatives."""
    return [
        {
            "id": s.token_id,
            "logprob": s.logprob,
            "top": [[alt.token_id, alt.logprob] for alt in s.top_logprobs],
        }
        for s in result.logprobs
    ]


def check_refusals(root: Path) -> dict[str, str]:
    out = {}
    for name, expected in (
        ("corrupt", edge_slm.ChecksumError),
        ("future", edge_slm.BundleVersionError),
    ):
        try:
            edge_slm.load(root / name)
        except edge_slm.BundleError as exc:
            assert isinstance(exc, expected), f"{name}: {type(exc).__name__}: {exc}"
            out[name] = type(exc).__name__
        else:
            raise AssertionError(f"the {name} bundle loaded")
    return out


def check_decoder(path: Path) -> dict[str, Any]:
    model = edge_slm.load(path)
    assert isinstance(model, edge_slm.TextGenerator)
    greedy = model.generate(PROMPT, max_new_tokens=12, temperature=0.0, logprobs=2)
    sampled = model.generate(
        PROMPT, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7, logprobs=2
    )
    # Streaming with a stop string taken from the middle of the greedy text: the streamed
    # text is the greedy text cut before it, and the stop string is never returned.
    text = greedy.text
    stop = text[len(text) // 2 : len(text) // 2 + 3] if len(text.strip()) >= 6 else None
    chunks = list(
        model.stream(PROMPT, max_new_tokens=12, temperature=0.0, stop=[stop] if stop else [])
    )
    streamed = "".join(c.text for c in chunks)
    if stop:
        assert streamed == text[: text.index(stop)], (streamed, text, stop)
        assert chunks[-1].finish_reason == "stop_string", chunks[-1]
    prompt = model.render_chat(MESSAGES)
    chat = model.chat(MESSAGES, max_new_tokens=8, temperature=0.0, logprobs=2)
    return {
        "greedy_ids": greedy.token_ids,
        "greedy_steps": steps(greedy),
        "greedy_text": text,
        "sampled_ids": sampled.token_ids,
        "sampled_steps": steps(sampled),
        "stop": stop,
        "streamed": streamed,
        "stream_chunks": len(chunks),
        "finish_reason": str(getattr(chunks[-1].finish_reason, "value", None)),
        "chat_prompt": prompt,
        "chat_prompt_ids": model.chat_ids(MESSAGES),
        "chat_ids": chat.token_ids,
        "chat_steps": steps(chat),
        "chat_text": chat.text,
    }


def check_encoders(root: Path) -> dict[str, Any]:
    classifier = edge_slm.load(root / "classifier")
    assert isinstance(classifier, edge_slm.TextClassifier)
    results = list(classifier.classify(TEXTS, top_k=len(classifier.labels)))
    embedder = edge_slm.load(root / "embedder")
    assert isinstance(embedder, edge_slm.TextEmbedder)
    vectors = [v.tolist() for v in embedder.embed(TEXTS)]
    return {
        "labels": [list(r.labels) for r in results],
        "scores": [list(r.scores) for r in results],
        "embeddings": vectors,
    }


def edge_slm_command() -> str:
    """The ``edge-slm`` console script beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "edge-slm"
    found = str(beside) if beside.exists() else shutil.which("edge-slm")
    assert found, "no edge-slm command"
    return found


def check_server(path: Path) -> dict[str, Any]:
    """`edge-slm serve` on a free port answers one chat completion as the library does."""
    process = subprocess.Popen(
        [edge_slm_command(), "serve", str(path), "--port", "0", "--no-cache"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        url = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                raise AssertionError(f"edge-slm serve ended: {process.wait()}")
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            url = found.group(1) if found else url
            if "ready:" in line:
                break
        assert url, "no port announced"
        conn = http.client.HTTPConnection("127.0.0.1", int(url), timeout=300)
        body = {
            "model": path.name,
            "messages": MESSAGES,
            "max_tokens": 8,
            "temperature": 0,
        }
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        data = json.loads(response.read())
        assert response.status == 200, data
        choice = data["choices"][0]
        return {
            "status": response.status,
            "content": choice["message"]["content"],
            "finish_reason": choice["finish_reason"],
        }
    finally:
        process.terminate()
        process.wait(timeout=60)


def check_smollm2(path: Path) -> dict[str, Any]:
    model = edge_slm.load(path)
    assert isinstance(model, edge_slm.TextGenerator)
    start = time.perf_counter()
    result = model.chat(
        [{"role": "user", "content": QUESTION}], max_new_tokens=24, temperature=0.0, logprobs=2
    )
    return {
        "answer": result.text.strip(),
        "ids": result.token_ids,
        "steps": steps(result),
        "seconds": time.perf_counter() - start,
        "decode_tokens_per_s": result.timings.decode_tokens_per_s,
    }


def check_doctor(path: Path) -> dict[str, Any]:
    """`edge-slm doctor --json` on the device: it sees a Pi 4 and no 32-bit warning."""
    done = subprocess.run(
        [edge_slm_command(), "doctor", "--quick", "--no-run", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(done.stdout)
    cpu, bundle = report["cpu"], report["bundle"]
    assert "Raspberry Pi 4" in cpu["model"], cpu
    assert report["onnxruntime"]["ok"], report["onnxruntime"]
    assert bundle["checksums_ok"], bundle
    messages = [f["message"] for f in report["findings"]]
    assert not any("32-bit" in m for m in messages), messages
    return {
        "cpu": cpu["model"],
        "machine": cpu["machine"],
        "memory_needed_bytes": bundle["memory_needed_bytes"],
        "kv_bytes_per_token": bundle["kv_bytes_per_token"],
        "findings": messages,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", action="store_true", help="assert aarch64 and no build stage")
    parser.add_argument("--no-smollm2", action="store_true")
    args = parser.parse_args()
    import numpy
    import onnxruntime
    import tokenizers

    report: dict[str, Any] = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tokenizers": tokenizers.__version__,
        "seconds": {},
    }
    if args.device:
        assert report["machine"] == "aarch64", report["machine"]
        present = [
            m for m in ("torch", "transformers", "optimum", "onnx") if importlib.util.find_spec(m)
        ]
        assert not present, f"build-stage packages installed on the device: {present}"
        # The wheel carries the build stage's code (edge_slm_export, edge_slm_quantize);
        # without torch it cannot run, and the runtime must never import it (asserted below).
        report["build_stage_code_in_wheel"] = [
            m for m in ("edge_slm_export", "edge_slm_quantize") if importlib.util.find_spec(m)
        ]

    def timed(name: str, call: Any, *a: Any) -> Any:
        start = time.perf_counter()
        value = call(*a)
        report["seconds"][name] = round(time.perf_counter() - start, 2)
        print(f"check_device: {name} {report['seconds'][name]:.1f} s", file=sys.stderr, flush=True)
        return value

    report["refusals"] = timed("refusals", check_refusals, args.bundles)
    report["decoders"] = {
        name: timed(name, check_decoder, args.bundles / name) for name in DECODERS
    }
    report["encoders"] = timed("encoders", check_encoders, args.bundles)
    report["server"] = timed("server", check_server, args.bundles / "fused-fp32")
    # The server answers exactly what the library answers for the same request.
    assert report["server"]["content"] == report["decoders"]["fused-fp32"]["chat_text"], report[
        "server"
    ]
    if not args.no_smollm2:
        report["smollm2"] = timed("smollm2", check_smollm2, args.bundles / "smollm2")
        if args.device:
            report["doctor"] = timed("doctor", check_doctor, args.bundles / "smollm2")
    loaded = sorted(m for m in BUILD_STAGE if m in sys.modules)
    assert not loaded, f"the runtime imported {loaded}"
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
