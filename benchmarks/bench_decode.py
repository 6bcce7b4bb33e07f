"""SmolLM2-135M-Instruct: our graphs and quantizations vs onnxruntime-genai, llama.cpp and torch.

Usage: ``make bench`` on a fresh clone (venv, assets, then this script), or from the
repository root with the build and dev extras installed:

    .venv/bin/python benchmarks/bench_decode.py [--rounds 3] [--threads 2] [--quick]
        [--genai-python PYTHON --genai-model DIR | --no-genai] [--no-llama] [--no-torch]
    .venv/bin/python benchmarks/bench_decode.py --profile BUNDLE   # where a step's time goes

One method for every engine (``CHILD_COMMON``): each engine runs in its own fresh process
per round, the engines interleaved (each round starting with another one) so that a busy
machine slows them alike. Every process gets the same prompt ids, loads (start-up,
timed), warms up, then runs greedy generations from an empty cache of 2 and 130 new
tokens (end-of-text never stops them) and a 512-token prompt + 1 token. Decode rate =
(tokens(130) - tokens(2)) / (t(130) - t(2)): prefill, the first token and every per-call
cost cancel. The table holds medians and per-round ratios. Rows: optimum's plain graph
in fp32 and int8, the fused graph in fp32, int8 and the registry's 4-bit variants
(``int4-rtn``, ``int4-rtn-shared``, ``int4-rtn-emb8``, ``int4-search``, ``gguf``: the
GGUF's own blocks, ``gguf-head4``), each through the library's own loop
(``generate_tokens``); genai's int4 model by its own loop; llama.cpp
(llama-cpp-python's ``Llama.generate``) on the GGUF the bundles come from; transformers
``generate`` on torch fp32 and a hand-written greedy loop over the same model.
``--quick`` measures the demo's two 4-bit bundles, genai and llama.cpp in 2 rounds of
shorter runs and only prints the table.

The torch rows run with the same thread rule as our engine (``edge_slm.engine.session``): all
``--threads``, and when the load average already fills the CPUs, idle OpenMP workers
sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``; onnxruntime's equivalent is
spinning off). Without it, torch's OpenMP (libgomp) on a 2-core machine shared with
another busy process collapses to 0.5-3 tok/s: every one of the ~300 parallel regions
per token waits at a barrier for a worker the scheduler has parked. That, not
``generate`` itself, is why this row once measured 0.9-2.8 tok/s.

Everything missing is built first, offline but for pip: our bundles (export from the
GGUF, then ``quantize_bundle``), and the peers (``benchmarks/peers.py``): the GGUF
de-quantized for torch (``bundles/smollm2-hf``), and onnxruntime-genai in its own venv
(``.cache/peers/genai-venv``: its builder needs transformers 5) with its int4 model built
from that folder (``.cache/peers/genai-smollm2-int4``), and llama-cpp-python in
``.cache/peers/llama-venv`` (compiled by pip). ``--genai-python/--genai-model``
use another genai instead, ``--no-genai`` skips it. Perplexity per variant (War of the
Worlds, 4,096 tokens, 512-token windows) is measured once and cached in
``bundles/perplexity.json`` keyed by the model's sha256.
Writes the table and the goals to ``docs/performance.md`` (the hand-written sections are
kept) and a size / perplexity / tokens-per-second plot to ``docs/performance.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import peers  # benchmarks/peers.py: torch's HF folder, genai's venv and model
from peers import GGUF, HF_DIR, ROOT

BUNDLES = ROOT / "bundles"
# optimum's plain graph, exported with graph="optimum" (not the demo's
# bundles/smollm2-135m-instruct*, which are the fused graph since "auto" picks it)
OPTIMUM = BUNDLES / "smollm2-optimum"
OPTIMUM_INT8 = BUNDLES / "smollm2-optimum-int8"
FUSED = BUNDLES / "smollm2-fused"
FUSED_INT4 = BUNDLES / "smollm2-fused-int4"
EVAL_TEXT = ROOT / ".cache/assets/war-of-the-worlds.txt"
PPL_CACHE = BUNDLES / "perplexity.json"
# fused-graph variants: row name -> (bundle folder, registry method)
VARIANTS = {
    "fused int4": (FUSED_INT4, "int4-rtn"),
    "fused int4-shared": (BUNDLES / "smollm2-fused-int4-shared", "int4-rtn-shared"),
    "fused int4-emb8": (BUNDLES / "smollm2-fused-int4-emb8", "int4-rtn-emb8"),
    "fused gguf": (BUNDLES / "smollm2-fused-gguf", "gguf"),
    "fused int4-search": (BUNDLES / "smollm2-fused-int4-search", "int4-search"),
    "fused gguf-head4": (BUNDLES / "smollm2-fused-gguf-head4", "gguf-head4"),
    # 8-bit on the fused graph: judged by the 8-bit goal, not the 4-bit ones
    "fused int8": (BUNDLES / "smollm2-fused-int8", "int8"),
}
EIGHT_BIT = ("optimum int8", "fused int8")  # row -> its fp32 source below
FP32_OF = {"optimum int8": "optimum fp32", "fused int8": "fused fp32"}
# the demo's SmolLM2 bundles (`make demo`): the --quick rows
QUICK_ENGINES = {
    "fused gguf-head4 (demo int4)": BUNDLES / "smollm2-135m-instruct-int4",
    "fused int4-search (demo int4-small)": BUNDLES / "smollm2-135m-instruct-int4-small",
}
# any built SmolLM2 bundle gives the KV layout and the prompt's tokenizer: make bench
# builds the fused fp32 one first, --quick measures the demo's
SMOLLM2_REFERENCES = (FUSED, *QUICK_ENGINES.values())
GENAI = "onnxruntime-genai int4"
TORCH = "transformers fp32 (torch)"
TORCH_LOOP = "torch fp32 KV loop (hand-written)"

LLAMA = "llama.cpp Q4_1 GGUF (llama-cpp-python)"
LLAMA_BENCH = "llama.cpp Q4_1 GGUF (llama-bench)"

# Every engine's child process gets the same prompt ids (our tokenizer; genai, llama.cpp
# and torch share SmolLM2's vocabulary) and runs the same schedule: load (timed: start-up),
# one untimed warm-up, then greedy runs from an empty cache of SHORT and LONG new tokens
# (end-of-text never stops them) and one of a PREFILL-token prompt + 1 token. Decode rate
# = (tokens(LONG) - tokens(SHORT)) / (t(LONG) - t(SHORT)): the prompt, the first token and
# every per-call cost cancel out. Prints one JSON line.
CHILD_COMMON = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
ids, prefill_ids = spec["ids"], spec["prefill_ids"]
short, long_ = spec["short"], spec["long"]
def peak():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
def measure(run, load_s, **extra):
    run(short, ids)  # warm-up
    t_short, n_short, first = run(short, ids)
    t_long, n_long, _ = run(long_, ids)
    t_prefill = run(1, prefill_ids)[0]
    print(json.dumps({"load_s": load_s, "time_to_first_token_s": first,
        "t_short": t_short, "t_long": t_long, "n_short": n_short, "n_long": n_long,
        "decode_tokens_per_s": (n_long - n_short) / (t_long - t_short),
        "prefill_s": t_prefill, "peak_rss_bytes": peak(), **extra}))
"""

EDGE_SCRIPT = (
    CHILD_COMMON
    + r"""
import edge_slm
begin = time.perf_counter()
model = edge_slm.load(spec["model"], threads=spec["threads"])
load_s = time.perf_counter() - begin
ban = {t: float("-inf") for t in model.manifest.special_tokens.eos_token_ids}
def run(n, prompt):
    # the library's own loop: sampler, processors (the EOS ban), detokenizer-free layer 1
    begin, count, first = time.perf_counter(), 0, None
    for _ in model.generate_tokens(prompt, max_new_tokens=n, temperature=0.0, logit_bias=ban):
        count += 1
        first = first or time.perf_counter() - begin
    return time.perf_counter() - begin, count, first
measure(run, load_s, session=model.decoder.session_source)
"""
)

# Cold start-up of an edge-slm row, in its own fresh process run right after the row's
# main one: load without the prepared-session cache (so no signed hash records either:
# every file hashed, the graph optimized and its weights pre-packed), then the first
# token of the same prompt. Prints one JSON line.
EDGE_COLD_SCRIPT = r"""
import json, sys, time
import edge_slm
spec = json.loads(sys.argv[1])
begin = time.perf_counter()
model = edge_slm.load(spec["model"], threads=spec["threads"], cache=False)
load_s = time.perf_counter() - begin
begin = time.perf_counter()
next(iter(model.generate_tokens(spec["ids"], max_new_tokens=1, temperature=0.0)))
print(json.dumps({"cold_load_s": load_s, "cold_first_token_s": time.perf_counter() - begin}))
"""

GENAI_SCRIPT = (
    CHILD_COMMON
    + r"""
import os
import numpy as np
import onnxruntime_genai as og
begin = time.perf_counter()
model = og.Model(spec["model"])
load_s = time.perf_counter() - begin
begin = time.perf_counter()
tokenizer = og.Tokenizer(model)  # edge-slm's and llama.cpp's loads include theirs
tokenizer_s = time.perf_counter() - begin
# sliding-window layers (Gemma 3) refuse a KV buffer shorter than the window
config = json.load(open(os.path.join(spec["model"], "genai_config.json")))
window = (config["model"]["decoder"].get("sliding_window") or {}).get("window_size", 0)
def run(n, prompt):
    begin, count, first = time.perf_counter(), 0, None
    params = og.GeneratorParams(model)
    total = len(prompt) + n
    params.set_search_options(max_length=max(total, window), min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(prompt, dtype=np.int32))
    while count < n:
        gen.generate_next_token()
        count += 1
        first = first or time.perf_counter() - begin
    return time.perf_counter() - begin, count, first
def old_method(n):
    # the method of the table before 2026-11-29: n / (time of the n steps after the
    # first token), one run of n after one warm-up of 4 tokens
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(len(ids) + n + 1, window), do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    gen.generate_next_token()
    begin = time.perf_counter()
    for _ in range(n):
        gen.generate_next_token()
    return n / (time.perf_counter() - begin)
measure(run, load_s, tokenizer_s=tokenizer_s, old_method_tokens_per_s=old_method(64))
"""
)

LLAMA_SCRIPT = (
    CHILD_COMMON
    + r"""
from llama_cpp import Llama
begin = time.perf_counter()
llm = Llama(model_path=spec["model"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
            n_ctx=1024, n_batch=512, verbose=False)
load_s = time.perf_counter() - begin
def run(n, prompt):
    llm.reset()  # an empty cache: no reuse of the previous run's prompt
    begin, count, first = time.perf_counter(), 0, None
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        count += 1
        first = first or time.perf_counter() - begin
        if count >= n:
            break
    return time.perf_counter() - begin, count, first
measure(run, load_s)
"""
)

# llama.cpp's own benchmark on the same GGUF, in C++ with no Python around its loop: a
# tg test of (LONG - SHORT) tokens from an empty cache (its average rate, after its own
# warm-up run) and a pp test of the PREFILL prompt; no load or first-token figure.
# Peak RSS: the llama-bench child's (getrusage of the children of this fresh process).
LLAMA_BENCH_SCRIPT = r"""
import json, resource, subprocess, sys
spec = json.loads(sys.argv[1])
prefill, decode = len(spec["prefill_ids"]), spec["long"] - spec["short"]
command = [spec["binary"], "-m", spec["model"], "-t", str(spec["threads"]),
           "-p", str(prefill), "-n", str(decode), "-r", "1", "-o", "json"]
tests = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
rate = {"prefill" if t["n_prompt"] else "decode": float(t["avg_ts"]) for t in tests}
nan = float("nan")
print(json.dumps({"load_s": nan, "time_to_first_token_s": nan,
    "decode_tokens_per_s": rate["decode"], "prefill_s": prefill / rate["prefill"],
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""

TORCH_SCRIPT = (
    CHILD_COMMON
    + r"""
import torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(spec["threads"])
begin = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
load_s = time.perf_counter() - begin
def run(n, prompt):
    x = torch.tensor([prompt])
    begin = time.perf_counter()
    with torch.inference_mode():
        if spec["mode"] == "generate":
            # the standard call: greedy, the model's own cache; min_new_tokens keeps an
            # early EOS from shortening the run
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        else:  # the hand-written greedy loop over the same model and its KV cache
            out = model(x, use_cache=True)
            for _ in range(n - 1):
                token = out.logits[:, -1:].argmax(-1)
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
    elapsed = time.perf_counter() - begin
    return elapsed, n, elapsed if n == 1 else None
def first_token():
    return run(1, ids)[0]
run(short, ids)
t1 = first_token()
t_short, n_short, _ = run(short, ids)
t_long, n_long, _ = run(long_, ids)
t_prefill = run(1, prefill_ids)[0]
import os
print(json.dumps({"load_s": load_s, "time_to_first_token_s": t1, "t_short": t_short,
    "t_long": t_long, "n_short": n_short, "n_long": n_long,
    "decode_tokens_per_s": (n_long - n_short) / (t_long - t_short), "prefill_s": t_prefill,
    "peak_rss_bytes": peak(), "threads": torch.get_num_threads(),
    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}))
"""
)


def _built(folder: Path, layout: str | None = None) -> bool:
    """True when ``folder`` holds a finished bundle (its manifest is written last).

    With ``layout``, a bundle of another graph layout is an error rather than a row
    measured under the wrong name.
    """
    from edge_slm.bundle import read_manifest
    from edge_slm.errors import BundleError

    try:
        manifest, _ = read_manifest(folder)
    except BundleError:
        return False
    found = manifest.decoder.layout if manifest.decoder else None
    if layout and found != layout:
        raise SystemExit(f"{folder} holds a {found!r} graph, expected {layout!r}: move it away")
    return True


def ensure_bundles(variants: dict[str, tuple[Path, str]], torch_row: bool, optimum: bool) -> None:
    """Build the missing bundles: fused fp32 from the GGUF, then each registry variant;
    optimum's plain graph and its int8; the torch rows' HF folder."""
    from edge_slm.cli.progress import stderr_reporter
    from edge_slm_export.decoder import ExportOptions, export_decoder
    from edge_slm_quantize.bundle import quantize_bundle

    def quantize(src: Path, folder: Path, method: str) -> None:
        print(f"building {folder.name} ({method})", file=sys.stderr, flush=True)
        quantize_bundle(
            src, folder, method, eval_text=EVAL_TEXT, window=512, overwrite=True,
            report=stderr_reporter,
        )  # fmt: skip

    if not _built(FUSED):
        options = ExportOptions(graph="fused", overwrite=True)
        export_decoder(str(GGUF), FUSED, options, report=stderr_reporter)
    for folder, method in variants.values():
        if not _built(folder):
            quantize(FUSED, folder, method)
    if optimum:
        if not _built(OPTIMUM, "optimum"):
            options = ExportOptions(graph="optimum", overwrite=True)
            export_decoder(str(GGUF), OPTIMUM, options, report=stderr_reporter)
        if not _built(OPTIMUM_INT8, "optimum"):
            quantize(OPTIMUM, OPTIMUM_INT8, "int8")
    if torch_row:
        peers.ensure_hf_dir()


def perplexities(engines: dict[str, Path]) -> dict[str, float]:
    """Perplexity per bundle on EVAL_TEXT, cached by the graph's sha256."""
    from edge_slm.bundle import read_manifest
    from edge_slm.generation.perplexity import bundle_perplexity

    cache: dict[str, float] = json.loads(PPL_CACHE.read_text()) if PPL_CACHE.exists() else {}
    found = {}
    for name, bundle in engines.items():
        manifest, checksums = read_manifest(bundle)
        key = f"{checksums.get('model.onnx')}:{EVAL_TEXT.name}:4096:512"
        q = manifest.quantization
        same_text = q.eval_text == EVAL_TEXT.name and q.eval_tokens == 4096
        if key not in cache and q.perplexity_after and same_text:
            cache[key] = q.perplexity_after  # measured by quantize_bundle on the same text
        if key not in cache:
            result = bundle_perplexity(bundle, EVAL_TEXT, window=512, max_tokens=4096)
            cache[key] = result.perplexity
            PPL_CACHE.write_text(json.dumps(cache, indent=1))
        found[name] = cache[key]
    return found


def torch_env(args: argparse.Namespace) -> dict[str, str]:
    """The torch child's environment: our thread rule, nothing inherited that changes it.

    ``--torch-wait auto`` applies ``edge_slm.engine.session``'s rule: when the load average
    already fills the CPUs, OpenMP workers sleep at barriers (``OMP_WAIT_POLICY=PASSIVE``)
    as our onnxruntime sessions turn spinning off; otherwise libgomp's default.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
    env["OMP_NUM_THREADS"] = str(args.threads)
    wait = args.torch_wait
    if wait == "auto":
        wait = "passive" if os.getloadavg()[0] >= (os.cpu_count() or 1) else "default"
    if wait != "default":
        env["OMP_WAIT_POLICY"] = wait.upper()
    return env


def genai_perplexity(model_dir: Path, reference_bundle: Path) -> float:
    """Perplexity of genai's int4 graph on EVAL_TEXT, scored exactly like our bundles.

    genai's graph returns logits for every position, so a NumPy loop with onnxruntime
    scores it: the reference bundle's tokenizer (the same vocabulary) and BOS rule (BOS +
    511 tokens per window when the model's tokenizer adds one), empty past (its
    GroupQueryAttention reads the past length from the attention mask).
    """
    import math

    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from edge_slm.bundle import read_bundle
    from edge_slm.generation.perplexity import (
        _window_nll,
        bos_for_scoring,
        encode_text,
        read_text,
        token_windows,
    )

    digest = hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest()
    size = sum(p.stat().st_size for p in model_dir.glob("*.onnx*"))
    key = f"genai:{digest}:{size}:{EVAL_TEXT.name}:4096:512"
    cache: dict[str, float] = json.loads(PPL_CACHE.read_text()) if PPL_CACHE.exists() else {}
    if key in cache:
        return cache[key]
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    tokenizer = Tokenizer.from_file(str(reference_bundle / "tokenizer.json"))
    ids = encode_text(tokenizer, read_text(EVAL_TEXT), 4096)
    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    # a past-present shared buffer (genai's default): sliding-window layers need a
    # capacity of at least the window even when nothing is cached yet
    capacity = (decoder.get("sliding_window") or {}).get("window_size", 0)
    empty = np.zeros(
        (1, decoder["num_key_value_heads"], capacity, decoder["head_size"]), np.float32
    )
    nll, predicted = 0.0, 0
    for chunk in token_windows(ids, 512, bos_for_scoring(read_bundle(reference_bundle))):
        feed = {"input_ids": chunk, "attention_mask": np.ones_like(chunk)}
        if "position_ids" in {i.name for i in session.get_inputs()}:
            feed["position_ids"] = np.arange(chunk.shape[1], dtype=chunk.dtype)[None]
        feed.update({p.name: empty for p in pasts})
        nll += _window_nll(session.run(["logits"], feed)[0][0], chunk[0])
        predicted += chunk.shape[1] - 1
    cache[key] = math.exp(nll / predicted)
    PPL_CACHE.write_text(json.dumps(cache, indent=1))
    return cache[key]


def smollm2_reference() -> Path:
    """The first built bundle of :data:`SMOLLM2_REFERENCES`."""
    for folder in SMOLLM2_REFERENCES:
        if _built(folder):
            return folder
    raise SystemExit(f"no SmolLM2 bundle built: looked for {[str(f) for f in SMOLLM2_REFERENCES]}")


def prompt_ids(count: int, tokenizer_file: Path | None = None) -> list[int]:
    """``count`` ids of a fixed English text repeated (SmolLM2's tokenizer unless told
    otherwise, no BOS)."""
    from tokenizers import Tokenizer

    from edge_slm.cli.bench import _TEXT

    tokenizer = Tokenizer.from_file(str(tokenizer_file or smollm2_reference() / "tokenizer.json"))
    ids = tokenizer.encode(_TEXT, add_special_tokens=False).ids
    return (ids * (count // len(ids) + 1))[:count]


def run_child(
    python: str, script: str, spec: dict[str, Any], env: dict[str, str] | None = None
) -> dict[str, Any]:
    """One fresh process running ``script`` with ``spec``; its JSON result."""
    out = subprocess.run(
        [python, "-c", script, json.dumps(spec)],
        check=True, capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_engine(name: str, engines: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """One measurement of engine ``name`` in its own process (see CHILD_COMMON)."""
    spec: dict[str, Any] = {
        "ids": prompt_ids(args.prompt_tokens),
        "prefill_ids": prompt_ids(args.prefill_tokens),
        "short": args.short_tokens,
        "long": args.new_tokens,
        "threads": args.threads,
    }
    env = None
    if name == GENAI:
        python, script, spec["model"] = args.genai_python, GENAI_SCRIPT, args.genai_model
    elif name == LLAMA:
        python, script, spec["model"] = args.llama_python, LLAMA_SCRIPT, str(GGUF)
    elif name == LLAMA_BENCH:
        python, script, spec["model"] = sys.executable, LLAMA_BENCH_SCRIPT, str(GGUF)
        spec["binary"] = args.llama_bench
    elif name in (TORCH, TORCH_LOOP):
        python, script, spec["model"] = sys.executable, TORCH_SCRIPT, str(HF_DIR)
        spec["mode"] = "generate" if name == TORCH else "loop"
        env = torch_env(args)
    else:
        python, script, spec["model"] = sys.executable, EDGE_SCRIPT, str(engines[name])
    result = run_child(python, script, spec, env)
    if script == EDGE_SCRIPT:  # cold start-up, in a fresh process of its own
        result.update(run_child(python, EDGE_COLD_SCRIPT, spec, env))
    result["model_bytes"], result["bytes_per_token"] = engine_bytes(name, engines, args)
    return result


def _onnx_bytes_per_token(model: Path) -> int:
    """Bytes of weights one decode step of an ONNX decoder reads.

    Every initializer counts whole, but a table only looked up (every consumer a Gather
    or GatherBlockQuantized: the embedding) counts one row, unless the lm_head reads it
    too (a tied, shared table), when it counts whole once.
    """
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in graph.initializer:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        size = int(np.prod(init.dims, dtype=np.int64)) * item
        if consumers.get(init.name, set()) <= {"Gather", "GatherBlockQuantized"} and init.dims:
            size //= int(init.dims[0])  # one row of a looked-up table
        total += size
    return total


def _gguf_bytes_per_token(path: Path) -> int:
    """Bytes of the GGUF's tensors one decode step reads (the token table counts one row
    unless it is also the output matrix, as in SmolLM2's tied one)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    total = 0
    for name, tensor in tensors.items():
        size = int(tensor.n_bytes)
        if name == "token_embd.weight" and "output.weight" in tensors:
            size //= int(max(tensor.shape))
        total += size
    return total


def engine_bytes(name: str, engines: dict[str, Path], args: argparse.Namespace) -> tuple[int, int]:
    """(model file bytes, bytes one decode step reads: weights as above + the KV cache
    at the middle of the long run, float32 K and V, float16 for llama.cpp)."""
    from edge_slm.bundle import read_manifest
    from edge_slm.engine.device import kv_bytes_per_token

    manifest, _ = read_manifest(smollm2_reference())
    positions = args.prompt_tokens + args.new_tokens // 2
    kv = kv_bytes_per_token(manifest) * positions
    if name == GENAI:
        folder = Path(args.genai_model)
        return sum(p.stat().st_size for p in folder.glob("*.onnx*")), kv + _onnx_bytes_per_token(
            folder / "model.onnx"
        )
    if name in (LLAMA, LLAMA_BENCH):
        return GGUF.stat().st_size, kv // 2 + _gguf_bytes_per_token(GGUF)
    if name in (TORCH, TORCH_LOOP):
        size = sum(p.stat().st_size for p in HF_DIR.glob("*.safetensors"))
        return size, 0  # not compared with the bound
    folder = engines[name]
    onnx_files = [p for p in folder.iterdir() if p.name.startswith("model.onnx")]
    return sum(p.stat().st_size for p in onnx_files), kv + _onnx_bytes_per_token(
        folder / "model.onnx"
    )


def read_bandwidth(threads: int, size_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best bytes/s ``threads`` threads read summing large arrays (numpy releases the GIL)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    chunk = size_bytes // threads // 8
    arrays = [np.ones(chunk) for _ in range(threads)]
    best = 0.0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            begin = time.perf_counter()
            list(pool.map(np.sum, arrays))
            best = max(best, chunk * 8 * threads / (time.perf_counter() - begin))
    return best


def bandwidth_bound(threads: int) -> float:
    """Memory bytes/s this machine moves at best: the larger of the copy rate (read +
    written bytes, ``edge_slm.engine.device.memory_bandwidth``) and the read rate."""
    from edge_slm.engine.device import memory_bandwidth

    return max(memory_bandwidth(threads), read_bandwidth(threads))


def _median(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def _ratio(runs: list[dict[str, float]], ref: list[dict[str, float]] | None, key: str) -> float:
    """Median over rounds of this engine's ``key`` / the reference's in the same round.

    Neighbours in one round saw the same machine load, so the per-round ratio is steadier
    than a ratio of medians on a shared machine.
    """
    if not ref:
        return float("nan")
    return float(statistics.median(a[key] / b[key] for a, b in zip(runs, ref, strict=False)))


def _prefill_rate(run: dict[str, float], tokens: int) -> dict[str, float]:
    return {"rate": tokens / run["prefill_s"]}


def _startup(run: dict[str, float]) -> dict[str, float]:
    """Load + tokenizer + first token: genai's ``og.Model`` loads no tokenizer, so its
    ``og.Tokenizer`` time is added (edge-slm's and llama.cpp's loads parse theirs)."""
    return {"s": _load_with_tokenizer(run) + run["time_to_first_token_s"]}


def _load_with_tokenizer(run: dict[str, float]) -> float:
    return run["load_s"] + run.get("tokenizer_s", 0.0)


def _cold_startup(run: dict[str, float]) -> dict[str, float]:
    """Load + first token without the prepared-session cache (genai: its only load)."""
    if "cold_load_s" not in run:
        return _startup(run)
    return {"s": run["cold_load_s"] + run["cold_first_token_s"]}


def _cold_load(runs: list[dict[str, float]], genai: list[dict[str, float]] | None) -> str:
    """Median cold load of an edge-slm row, and its median per-round ratio to genai's
    ``og.Model`` load alone and to genai's ``og.Model`` + ``og.Tokenizer``."""
    if "cold_load_s" not in runs[0]:
        return "n/a"
    text = f"{_median(runs, 'cold_load_s'):.2f}"
    if genai:
        loads = [{"s": r["cold_load_s"]} for r in runs]
        model = _ratio(loads, [{"s": g["load_s"]} for g in genai], "s")
        both = _ratio(loads, [{"s": _load_with_tokenizer(g)} for g in genai], "s")
        text += f" ({_fmt(model)}x genai's model, {_fmt(both)}x with its tokenizer)"
    return text


def _rounds(runs: list[dict[str, float]], ref: list[dict[str, float]] | None, key: str) -> str:
    """The median per-round ratio and each round's, e.g. ``1.21 (1.18, 1.21, 1.30)``."""
    if not ref:
        return "n/a"
    each = [a[key] / b[key] for a, b in zip(runs, ref, strict=False)]
    return f"{statistics.median(each):.2f} ({', '.join(f'{x:.2f}' for x in each)})"


def write_table(
    results: dict[str, list[dict[str, float]]],
    ppl: dict[str, float],
    args: argparse.Namespace,
) -> str:
    """Markdown table of medians, with per-round ratios to genai, llama.cpp and torch."""
    decode = {name: _median(runs, "decode_tokens_per_s") for name, runs in results.items()}
    bound = args.bound
    lines = [
        "| engine | file MiB | perplexity | load s | cold load s | first token ms | "
        f"prefill {args.prefill_tokens} tok/s | prefill x genai | decode tok/s | x genai "
        "(rounds) | x llama-bench (rounds) | x llama-cpp-python (rounds) | x torch generate | "
        "peak RSS MiB | MB read per token | % of bandwidth bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    genai_rates = [_prefill_rate(r, args.prefill_tokens) for r in results.get(GENAI, [])]
    for name, runs in results.items():
        rates = [_prefill_rate(r, args.prefill_tokens) for r in runs]
        read = runs[0]["bytes_per_token"]
        cells = [
            name,
            f"{runs[0]['model_bytes'] / 2**20:.1f}",
            f"{ppl[name]:.2f}" if name in ppl else "n/a",
            f"{_median(runs, 'load_s'):.2f}",
            _cold_load(runs, results.get(GENAI)),
            f"{1000 * _median(runs, 'time_to_first_token_s'):.0f}",
            f"{_median(rates, 'rate'):.0f}",
            _fmt(_ratio(rates, genai_rates, "rate")),
            f"{decode[name]:.1f}",
            _rounds(runs, results.get(GENAI), "decode_tokens_per_s"),
            _rounds(runs, results.get(LLAMA_BENCH), "decode_tokens_per_s"),
            _rounds(runs, results.get(LLAMA), "decode_tokens_per_s"),
            _fmt(_ratio(runs, results.get(TORCH), "decode_tokens_per_s")),
            f"{_median(runs, 'peak_rss_bytes') / 2**20:.0f}",
            f"{read / 1e6:.1f}" if read else "n/a",
            f"{100 * read * decode[name] / bound:.0f}%" if read and bound else "n/a",
        ]
        cells = ["n/a" if cell.startswith("nan") else cell for cell in cells]  # not measured
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nMemory bandwidth bound measured: {bound / 1e9:.1f} GB/s.\n"


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"  # NaN: no reference row


def write_goals(
    results: dict[str, list[dict[str, float]]],
    ppl: dict[str, float],
    args: argparse.Namespace,
) -> str:
    """Where each goal of issue 5 stands, from this run's numbers (4-bit rows vs genai int4)."""
    four_bit = [n for n in VARIANTS if n in results and n not in EIGHT_BIT]
    genai = results.get(GENAI)
    rows = []

    def verdict(names: list[str]) -> str:
        if not names:
            return "**not met**"
        return f"**met** by {', '.join(names)}" if len(names) < len(four_bit) else "**met**"

    def per_variant(values: dict[str, float], fmt: str) -> str:
        return "; ".join(f"{n} {fmt.format(v)}" for n, v in values.items())

    if genai:
        dec = {n: _ratio(results[n], genai, "decode_tokens_per_s") for n in four_bit}
        rows.append(("4-bit decode >= 1.1x genai int4", per_variant(dec, "{:.2f}x"),
                     verdict([n for n, v in dec.items() if v >= 1.1])))  # fmt: skip
        g_rates = [_prefill_rate(r, args.prefill_tokens) for r in genai]
        pre = {
            n: _ratio([_prefill_rate(r, args.prefill_tokens) for r in results[n]], g_rates, "rate")
            for n in four_bit
        }
        rows.append(("4-bit prefill 512 >= genai", per_variant(pre, "{:.2f}x"),
                     verdict([n for n, v in pre.items() if v >= 1.0])))  # fmt: skip
    if TORCH in results and "fused fp32" in results:
        x = _ratio(results["fused fp32"], results[TORCH], "decode_tokens_per_s")
        text = f"fused fp32 {x:.2f}x `generate`"
        if TORCH_LOOP in results:
            loop = _ratio(results["fused fp32"], results[TORCH_LOOP], "decode_tokens_per_s")
            text += f" ({loop:.2f}x the hand-written KV loop)"
        rows.append(("fp32 decode >= 3x torch `generate`", text,
                     "**met**" if x >= 3 else "**not met**"))  # fmt: skip
    if genai:
        g_rss = _median(genai, "peak_rss_bytes")
        g_size = genai[0]["model_bytes"]
        rss = {n: _median(results[n], "peak_rss_bytes") / g_rss for n in four_bit}
        rows.append(("4-bit peak RSS <= genai int4", per_variant(rss, "{:.2f}x"),
                     verdict([n for n, v in rss.items() if v <= 1.0])))  # fmt: skip
        size = {n: results[n][0]["model_bytes"] / g_size for n in four_bit}
        rows.append(("4-bit file size <= genai int4", per_variant(size, "{:.3f}x"),
                     verdict([n for n, v in size.items() if v <= 1.0])))  # fmt: skip
        g_start = [_startup(r) for r in genai]
        start = {n: _ratio([_startup(r) for r in results[n]], g_start, "s") for n in four_bit}
        rows.append(("4-bit start-up (load + tokenizer + first token) <= genai",
                     per_variant(start, "{:.2f}x"),
                     verdict([n for n, v in start.items() if v <= 1.0])))  # fmt: skip
        g_cold = [_cold_startup(r) for r in genai]
        cold = {n: _ratio([_cold_startup(r) for r in results[n]], g_cold, "s") for n in four_bit}
        rows.append(("4-bit cold start-up (load + tokenizer + first token, no prepared-session "
                     "cache) <= genai",
                     per_variant(cold, "{:.2f}x"),
                     verdict([n for n, v in cold.items() if v <= 1.0])))  # fmt: skip
    eight = {n: ppl[n] / ppl[FP32_OF[n]] - 1 for n in EIGHT_BIT if n in ppl and FP32_OF[n] in ppl}
    if eight:
        desc = "; ".join(
            f"{n} {ppl[n]:.2f} vs {ppl[FP32_OF[n]]:.2f} ({100 * d:+.2f}%)" for n, d in eight.items()
        )
        met = [n for n, d in eight.items() if d <= 0.01]
        status = "**not met**" if not met else "**met**"
        if met and len(met) < len(eight):
            status += f" by {', '.join(met)}"
        rows.append(("8-bit perplexity within 1% of fp32", desc, status))
    if genai and GENAI in ppl:
        g_size = genai[0]["model_bytes"]
        desc = per_variant(
            {n: (ppl[n], results[n][0]["model_bytes"] / 2**20) for n in four_bit if n in ppl},
            "{0[0]:.2f} at {0[1]:.1f} MiB",
        )
        desc += f"; genai {ppl[GENAI]:.2f} at {g_size / 2**20:.1f} MiB"
        both = [
            n for n in four_bit
            if ppl.get(n, 1e9) < ppl[GENAI] and results[n][0]["model_bytes"] <= g_size
        ]  # fmt: skip
        lower = [n for n in four_bit if ppl.get(n, 1e9) < ppl[GENAI]]
        status = verdict(both)
        if not both and lower:
            status += f" (lower perplexity but a larger file: {', '.join(lower)})"
        rows.append(("4-bit perplexity < genai int4 at no larger a file", desc, status))
    bound = args.bound
    if bound:
        pct = {
            n: 100 * results[n][0]["bytes_per_token"] * _median(results[n], "decode_tokens_per_s")
            / bound for n in four_bit
        }  # fmt: skip
        rows.append(("decode within 2x of the bandwidth bound (>= 50%)",
                     per_variant(pct, "{:.0f}%"), verdict([n for n, v in pct.items() if v >= 50])))  # fmt: skip
    lines = ["| goal (issue 5) | this run | status |", "|---|---|---|"]
    lines += [f"| {goal} | {value} | {status} |" for goal, value, status in rows]
    return "\n".join(lines) + "\n"


def plot(
    results: dict[str, list[dict[str, float]]], ppl: dict[str, float], out: Path
) -> Path | None:
    """Scatter of file size vs perplexity, marker area and label = decode tokens/s."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (dev extra): no plot", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    stacked: dict[tuple[int, int], int] = {}  # points at the same spot: labels stacked
    for name, runs in results.items():
        if name not in ppl or ppl[name] != ppl[name]:
            continue
        size = runs[0]["model_bytes"] / 2**20
        speed = _median(runs, "decode_tokens_per_s")
        spot = (int(size // 25), round(ppl[name]))
        below = stacked[spot] = stacked.get(spot, -1) + 1
        ax.scatter(size, ppl[name], s=20 + 8 * speed, alpha=0.6)
        ax.annotate(
            f"{name}: {speed:.0f} tok/s",
            (size, ppl[name]),
            xytext=(-150 if size > 400 else 6, 14 - 11 * below),
            textcoords="offset points",
            fontsize=8,
        )
    ax.margins(x=0.08, y=0.12)
    ax.set_xlabel("model file (MiB)")
    ax.set_ylabel("perplexity (War of the Worlds, 4,096 tokens)")
    ax.set_title("SmolLM2-135M: size vs perplexity (marker area = decode tok/s)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _cpu_name() -> str:
    """The CPU model and count, e.g. ``Intel(R) Xeon(R) Processor x 2 CPUs``."""
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} x {os.cpu_count()} CPUs"


# ------------------------------------------------------------------ --profile: one step
PROFILE_PROMPT = "Write a short story about a robot who learns to paint, in three paragraphs."
PROFILE_PARTS = {
    "forward": "onnxruntime forward (`run_with_iobinding`)",
    "sampling": "sampling (processors, greedy argmax, log-probs)",
    "text": "text (streaming detokenizer, stop strings)",
    "other": "loop, step scheduler, input binding, generator hand-offs",
    "total": "**whole decode step**",
}


def profile_steps(bundle: Path, threads: int, new_tokens: int, runs: int) -> str:
    """Where a decode step's time goes, through the library's own loop (``stream_chat``).

    Wraps, in this process, onnxruntime's ``run_with_iobinding`` and ``run`` (the
    forward), ``SamplingState.sample`` (processors, sampler, log-probs) and
    ``TextChunker.push`` (detokenizer, stop strings); the rest of the wall time is the
    loop, the step scheduler, binding the inputs and the generator hand-offs. Greedy,
    no processor, at most ``new_tokens``; ms per decode step (first token excluded), medians over ``runs`` runs; once without log-probs (the default) and
    once with ``logprobs=0`` (the chosen token's log-probability, which every step
    computed before 2026-11-29). Returns a markdown table.
    """
    import time

    import edge_slm
    from edge_slm.generation import chunks, loop

    model = edge_slm.load(bundle, threads=threads)
    session: Any = model.decoder.session  # type: ignore[union-attr]
    spent = dict.fromkeys(("forward", "sampling", "text"), 0.0)

    def timed(key: str, function: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            begin = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                spent[key] += time.perf_counter() - begin

        return wrapper

    for name in ("run_with_iobinding", "run"):
        setattr(session, name, timed("forward", getattr(session, name)))
    loop.SamplingState.sample = timed("sampling", loop.SamplingState.sample)  # type: ignore[method-assign]
    chunks.TextChunker.push = timed("text", chunks.TextChunker.push)  # type: ignore[method-assign]
    rows: dict[str, list[dict[str, float]]] = {}
    messages = [{"role": "user", "content": PROFILE_PROMPT}]
    model.chat(messages, max_new_tokens=4, temperature=0.0)  # warm-up
    for _ in range(runs):
        for label, logprobs in (("logprobs=None (default)", None), ("logprobs=0", 0)):
            stream = model.stream_chat(
                messages, max_new_tokens=new_tokens, temperature=0.0, logprobs=logprobs
            )
            steps, begin = 0, 0.0
            for chunk in stream:
                if not steps:  # timing starts after the first token (prefill excluded)
                    begin = time.perf_counter()
                    spent.update(dict.fromkeys(spent, 0.0))
                steps += len(chunk.steps)
            total = time.perf_counter() - begin
            decoded = steps - 1
            part = {k: 1e3 * v / decoded for k, v in spent.items()}
            part["total"] = 1e3 * total / decoded
            part["other"] = part["total"] - sum(part[k] for k in spent)
            rows.setdefault(label, []).append(part)
    labels = list(rows)
    med = {
        lab: {k: statistics.median(r[k] for r in rows[lab]) for k in PROFILE_PARTS}
        for lab in labels
    }
    lines = [
        f"| part of a decode step | {' | '.join(f'ms, {lab}' for lab in labels)} | share, default |",
        "|---|" + "---:|" * (len(labels) + 1),
    ]
    for key, what in PROFILE_PARTS.items():
        cells = " | ".join(f"{med[lab][key]:.3f}" for lab in labels)
        share = 100 * med[labels[0]][key] / med[labels[0]]["total"]
        lines.append(f"| {what} | {cells} | {share:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument(
        "--new-tokens", type=int, default=130, help="the long run's tokens (decode rate)"
    )
    parser.add_argument(
        "--short-tokens", type=int, default=2, help="the short run's tokens (subtracted)"
    )
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run of the method: the demo's two 4-bit bundles, genai and llama.cpp, "
        "2 rounds, 34 tokens, a 128-token prefill, no torch, no perplexity; prints only",
    )
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    parser.add_argument("--llama-python", help="python with llama-cpp-python (default: peers.py)")
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench binary (default: peers.py)")
    parser.add_argument(
        "--genai-python",
        help="python of a venv with onnxruntime-genai 0.18 (default: set up by peers.py)",
    )
    parser.add_argument(
        "--genai-model",
        help="folder written by genai's builder, -p int4 -e cpu (default: set up by peers.py)",
    )
    parser.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai")
    parser.add_argument("--genai-perplexity", type=float, help="genai's perplexity, if known")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch rows")
    parser.add_argument(
        "--no-torch-loop", action="store_true", help="skip the hand-written torch loop row"
    )
    parser.add_argument(
        "--torch-wait",
        choices=("auto", "default", "passive", "active"),
        default="auto",
        help="OMP_WAIT_POLICY of the torch rows (auto: passive when the load average "
        "fills the CPUs, like our engine's spinning rule)",
    )
    parser.add_argument("--no-optimum", action="store_true", help="skip optimum's plain graph")
    parser.add_argument("--raw-json", type=Path, help="also write every run's numbers here")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/performance.md")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="BUNDLE",
        help="only profile decode steps of BUNDLE (where the time goes) and print a table",
    )
    args = parser.parse_args()
    if args.profile:
        print(f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        print(profile_steps(args.profile, args.threads, 128, args.rounds))
        print(f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        return 0
    if args.no_genai:
        args.genai_python = args.genai_model = None
    elif bool(args.genai_python) != bool(args.genai_model):
        parser.error("give --genai-python and --genai-model together (or neither)")
    if not args.no_genai and not args.genai_model:  # first: a pip failure shows early
        genai = peers.genai_paths_or_report()
        if genai is None:
            return 1
        args.genai_python, args.genai_model = genai
    if not args.no_llama and not args.llama_python:
        try:
            args.llama_python = str(peers.ensure_llama(python=True, server=False).python)
            args.llama_bench = args.llama_bench or str(peers.llama_bench_binary())
        except peers.PeerError as error:
            print(f"setting up llama-cpp-python failed: {error}", file=sys.stderr)
            return 1
    engines: dict[str, Path] = {}
    ppl: dict[str, float] = {}
    if args.quick:
        args.rounds, args.new_tokens, args.prefill_tokens = 2, 34, 128
        args.no_torch = True
        engines = {name: path for name, path in QUICK_ENGINES.items() if _built(path)}
    else:
        ensure_bundles(VARIANTS, not args.no_torch, not args.no_optimum)
        if not args.no_optimum:
            engines["optimum fp32"] = OPTIMUM
            engines["optimum int8"] = OPTIMUM_INT8
        engines["fused fp32"] = FUSED
        engines.update({name: folder for name, (folder, _) in VARIANTS.items()})
        ppl = perplexities(engines)
        if args.genai_perplexity:
            ppl[GENAI] = args.genai_perplexity
        elif args.genai_model:
            ppl[GENAI] = genai_perplexity(Path(args.genai_model), FUSED)
    names = list(engines)
    if args.genai_model:
        names.append(GENAI)
    if args.llama_python:
        names.append(LLAMA)
    if args.llama_bench and not args.no_llama:
        names.append(LLAMA_BENCH)
    if not args.no_torch:
        names.append(TORCH)
        if not args.no_torch_loop:
            names.append(TORCH_LOOP)
    args.bound = bandwidth_bound(args.threads)  # measured again after every round
    load_before = os.getloadavg()
    print(f"start: load average {load_before}", file=sys.stderr)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for name in engines:  # build each bundle's prepared-session cache entry, untimed
        run_child(sys.executable, EDGE_SCRIPT, {"model": str(engines[name]), "ids": [1, 2],
                  "prefill_ids": [1, 2], "short": 1, "long": 2, "threads": args.threads})  # fmt: skip
    for round_ in range(args.rounds):
        shift = round_ % len(names)  # each round starts with another engine
        for name in names[shift:] + names[:shift]:
            results[name].append(run_engine(name, engines, args))
        args.bound = max(args.bound, bandwidth_bound(args.threads))  # the best moment counts
        print(f"round {round_ + 1}/{args.rounds}: load average {os.getloadavg()}", file=sys.stderr)
    load_after = os.getloadavg()
    if GENAI in results:
        old = statistics.median(r["old_method_tokens_per_s"] for r in results[GENAI])
        print(f"genai by the old method (64 steps after the first token): {old:.1f} tok/s")
    if not args.no_torch:
        ppl[TORCH] = ppl.get("fused fp32", float("nan"))  # same weights, same float math
    table = write_table(results, ppl, args)
    loads = f"load average at the start {load_before[0]:.1f}, at the end {load_after[0]:.1f}"
    if args.quick:
        print(table + "\n" + loads)
        return 0
    goals = write_goals(results, ppl, args)
    print(table + "\n" + goals + "\n" + loads)
    if args.raw_json:
        args.raw_json.write_text(json.dumps({"runs": results, "perplexity": ppl}, indent=1))
    waits = sorted(
        {str(r.get("omp_wait_policy")) for n in (TORCH, TORCH_LOOP) for r in results.get(n, [])}
    )
    picture = plot(results, ppl, args.out.with_suffix(".png"))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {_cpu_name()}, {args.threads} threads"
    head = (
        "# Performance: SmolLM2-135M-Instruct\n\n"
        f"Measured {when} on {machine} (a shared machine), {args.rounds} interleaved "
        "rounds, every engine in its own fresh process per round, each round starting with "
        "another engine; medians, and per-round ratios in parentheses (neighbours in one "
        f"round saw the same load). The same {args.prompt_tokens}-token prompt ids for every "
        "engine, greedy, end-of-text never stopping a run. **decode tok/s** = (tokens("
        f"{args.new_tokens}) - tokens({args.short_tokens})) / (t({args.new_tokens}) - "
        f"t({args.short_tokens})) of two runs from an empty cache in the same process "
        "(prompt, first token and per-call costs cancel); **first token**: the prompt + 1 "
        f"token; **prefill**: a {args.prefill_tokens}-token prompt + 1 token; **load**: "
        "start-up in the fresh process (edge-slm rows from the prepared-session cache); "
        "**cold load**: `edge_slm.load(..., cache=False)` in another fresh process right "
        "after the row's (no prepared-session cache: every file hashed, the graph optimized "
        "and pre-packed), with the median per-round ratios to genai's `og.Model` load and "
        "to its `og.Model` + `og.Tokenizer` (edge-slm's load parses the tokenizer too); "
        "the start-up goal rows add genai's `og.Tokenizer` time for the same reason. "
        "**MB read per token**: the weights a decode step reads (a looked-up embedding "
        "table counts one row, a tied table the lm_head reads counts whole) plus the KV "
        "cache at mid-run; **% of bandwidth bound** = that x decode tok/s / the larger of "
        "the measured copy (read + written) and read rates. Perplexity: War of the "
        "Worlds, 4,096 tokens, 512-token windows. Reproduce with `make bench` "
        "(`benchmarks/bench_decode.py`, `--quick` for a smoke run; peers set up by "
        f"`benchmarks/peers.py`). {loads}. Torch rows: {args.threads} threads, "
        f"OMP_WAIT_POLICY {', '.join(waits) or 'n/a'} (`--torch-wait {args.torch_wait}`).\n\n"
        + table
        + (f"\n![size vs perplexity vs tokens/s]({picture.name})\n" if picture else "")
    )
    goals_section = "## Goals of issue 5, from this run\n\n" + goals
    # only the generated parts change: the head (up to the first section) and the goals
    # section; every hand-written section is kept where it is
    rest = ""
    if args.out.exists():
        old = args.out.read_text(encoding="utf-8")
        rest = old[old.index("\n## ") + 1 :] if "\n## " in old else ""
    start = rest.find("## Goals of issue 5")
    if start < 0:
        rest = goals_section + "\n" + rest
    else:
        end = rest.find("\n## ", start + 1)
        rest = rest[:start] + goals_section + ("\n" + rest[end + 1 :] if end >= 0 else "")
    args.out.write_text(head + "\n" + rest, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
