"""The main job, offline: SmolLM2-135M-Instruct from a GGUF file to three bundles and a chat,
then the everyday classifiers: customer-feedback sentiment and a 157-intent kiosk router.

1. export the GGUF (de-quantized by transformers) to an fp32 ONNX bundle, validated
   against torch;
2. quantize it to 8-bit and 4-bit weight-only bundles, with perplexity before/after
   on real English prose when the text is there;
3. load each bundle with the torch-free runtime and answer a chat question, printing
   bundle sizes, load time, time to first token and tokens/s;
4. export all-MiniLM-L6-v2 as an embedder (``bundles/minilm``) and its dynamic int8
   twin (``bundles/minilm-int8``); teach the int8 one two labels on the device, the way
   ``edge-slm train`` does (NumPy, no torch), from the Pang & Lee polarity sentences
   (``bundles/sentiment-int8``); export the kiosk intent router (MiniLM + the 157-intent
   scikit-learn head of rag-intent-classifier, ``bundles/intents``); classify a few
   lines of feedback and visitor requests with both, with their speed.

Run by ``make demo`` (which fetches the assets first). ``--only classification``
skips the generators.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

QUESTION = "What is the capital of France?"
# bundle suffix -> quantization method (see quantize/methods/)
VARIANTS = {
    "int8": "int8",  # 8-bit weight-only, int8 activations
    # 4-bit, best quality: the GGUF's own Q4_1 layer blocks carried over unchanged, the
    # Q8_0 embedding / lm_head re-quantized to 4 bits (searched scales), stored once
    "int4": "gguf-head4",
    # 4-bit, smallest and fastest: every weight re-quantized with searched scales
    "int4-small": "int4-search",
}


def bundle_size(folder: Path) -> int:
    """Bytes of every file in a bundle."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(gguf: Path, out: Path, eval_text: Path | None, rebuild: bool) -> dict[str, Path]:
    """Export and quantize (skipped for bundles that already exist and check out)."""
    from edge_slm.bundle import read_bundle
    from edge_slm.cli.progress import stderr_reporter
    from edge_slm.errors import BundleError
    from edge_slm_export import ExportOptions, export_decoder
    from edge_slm_quantize.bundle import quantize_bundle

    def fresh(folder: Path) -> bool:
        try:
            read_bundle(folder)
        except BundleError:
            return False
        return not rebuild

    bundles = {"fp32": out / "smollm2-135m-instruct"}
    if not fresh(bundles["fp32"]):
        export_decoder(
            str(gguf), bundles["fp32"], ExportOptions(overwrite=True), report=stderr_reporter
        )
        rebuild = True  # the quantized bundles must come from this export
    for name, method in VARIANTS.items():
        bundles[name] = out / f"smollm2-135m-instruct-{name}"
        if not fresh(bundles[name]):
            quantize_bundle(
                bundles["fp32"],
                bundles[name],
                method,
                eval_text=eval_text,
                overwrite=True,
                report=stderr_reporter,
            )
    return bundles


FEEDBACK = [
    "The staff were friendly and my order arrived a day early.",
    "Terrible support: I waited forty minutes and nobody answered.",
    "The screen is gorgeous, but the battery barely lasts a morning.",
    "Honestly the best coffee I have had in years.",
    "The app keeps crashing whenever I try to pay.",
]
REQUESTS = [
    "where can i find the restrooms",
    "how do i get to the train station",
    "my card was declined at the store",
    "what's the exchange rate between dollars and euros",
    "translate good morning into spanish",
]
SENTIMENT_C = 1.0  # best on a validation part of the training split (docs/classification.md)


def build_classifiers(assets: Path, out: Path, rebuild: bool) -> dict[str, Path]:
    """Embedders, the sentiment head trained on the device and the intent router."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fetch_assets import INTENT_DIR, MINILM_DIR, polarity_examples

    from edge_slm.bundle import read_bundle
    from edge_slm.cli.progress import Progress, stderr_reporter
    from edge_slm.encoders.train_head import train_classifier
    from edge_slm.errors import BundleError
    from edge_slm_export.encoder import EncoderExportOptions, export_encoder
    from edge_slm_export.setfit import export_setfit, load_sklearn_head
    from edge_slm_quantize.encoder import quantize_encoder_bundle

    def fresh(folder: Path) -> bool:
        try:
            read_bundle(folder)
        except BundleError:
            return False
        return not rebuild

    overwrite = EncoderExportOptions(overwrite=True)
    bundles = {name: out / name for name in ("minilm", "minilm-int8", "sentiment-int8", "intents")}
    if not fresh(bundles["minilm"]):
        export_encoder(str(assets / MINILM_DIR), bundles["minilm"], "feature-extraction",
                       overwrite, report=stderr_reporter)  # fmt: skip
        rebuild = True  # what follows is made from this export
    if not fresh(bundles["minilm-int8"]):
        quantize_encoder_bundle(bundles["minilm"], bundles["minilm-int8"], "dynamic-int8",
                                overwrite=True, report=stderr_reporter)  # fmt: skip
    if not fresh(bundles["sentiment-int8"]):
        examples = polarity_examples(assets)
        with Progress(total=len(examples), label="training sentiment", unit="texts") as bar:
            result = train_classifier(bundles["minilm-int8"], examples, bundles["sentiment-int8"],
                                      C=SENTIMENT_C, overwrite=True, progress=bar.update)  # fmt: skip
        t = result.training
        print(f"sentiment-int8: embedded {len(examples)} sentences in {t.embed_seconds:.1f} s, "
              f"fitted in {t.fit_seconds:.2f} s", file=sys.stderr)  # fmt: skip
    if not fresh(bundles["intents"]):
        models = assets / INTENT_DIR
        head = load_sklearn_head(models / "LogisticRegression.joblib", models / "label_map.joblib")
        export_setfit(str(assets / MINILM_DIR), head, bundles["intents"], overwrite,
                      report=stderr_reporter)  # fmt: skip
    return bundles


def show_classifiers(bundles: dict[str, Path]) -> None:
    """Classify the feedback and the requests; print labels, scores and speed."""
    import time

    import edge_slm

    for title, name, texts in (
        ("Customer feedback", "sentiment-int8", FEEDBACK),
        ("Visitor requests", "intents", REQUESTS),
    ):
        start = time.perf_counter()
        clf = edge_slm.load(bundles[name])
        load_s = time.perf_counter() - start
        clf.classify(texts[0])  # warm-up: the first run prepares the session
        start = time.perf_counter()
        results = [clf.classify(text) for text in texts]
        per_text = (time.perf_counter() - start) / len(texts)
        accuracy = ""
        training = clf.manifest.training
        if training is not None and training.holdout_accuracy is not None:
            accuracy = (f", {100 * training.holdout_accuracy:.1f}% on "
                        f"{training.holdout_examples} held-out sentences")  # fmt: skip
        print(f"\n{title} (bundles/{name}: {len(clf.labels)} labels{accuracy})")
        for text, result in zip(texts, results, strict=True):
            print(f"  {result.label:<14} {result.score:5.2f}  {text}")
        print(f"  load {load_s:.2f} s, {1000 * per_text:.1f} ms per text "
              f"({1 / per_text:.0f} texts/s, one at a time)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=Path(".cache/assets"))
    parser.add_argument("--out", type=Path, default=Path("bundles"))
    parser.add_argument("--rebuild", action="store_true", help="export and quantize again")
    parser.add_argument(
        "--only", choices=("generation", "classification"), help="run one half of the demo"
    )
    args = parser.parse_args()
    if args.only != "generation":
        if not (args.assets / "minilm").is_dir() or not (args.assets / "intent").is_dir():
            print(f"missing encoder assets in {args.assets}: run "
                  "examples/fetch_assets.py --encoders first", file=sys.stderr)  # fmt: skip
            return 1
        classifiers = build_classifiers(args.assets, args.out, args.rebuild)
    if args.only != "classification":
        status = generation_demo(args)
        if status:
            return status
    if args.only != "generation":
        show_classifiers(classifiers)
    return 0


def generation_demo(args: argparse.Namespace) -> int:
    """Build the SmolLM2 bundles (if needed), chat with each, print the table."""
    gguf = args.assets / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        print(f"missing {gguf}: run examples/fetch_assets.py first", file=sys.stderr)
        return 1
    eval_text = args.assets / "war-of-the-worlds.txt"
    bundles = build(gguf, args.out, eval_text if eval_text.is_file() else None, args.rebuild)

    import edge_slm

    int8 = edge_slm.load(bundles["int8"], verify=False).manifest.quantization
    fp32_perplexity = int8.perplexity_before
    rows = []
    messages = [{"role": "user", "content": QUESTION}]
    print(f"\nQ: {QUESTION}")
    for name, folder in bundles.items():
        model = edge_slm.load(folder)
        result = model.chat(messages, max_new_tokens=64, temperature=0.0)
        t = result.timings
        q = model.manifest.quantization
        # A quantized bundle records its fp32 source's perplexity as "before".
        ppl = q.perplexity_after if q.method != "none" else fp32_perplexity
        print(f"A ({name}): {result.text.strip()}")
        rows.append(
            (name, q.method, bundle_size(folder) / 1e6, t.load_s, t.time_to_first_token_s,
             t.prompt_tokens_per_s, t.decode_tokens_per_s, ppl)
        )  # fmt: skip
    print(
        f"\n{'bundle':<12} {'method':<12} {'size MB':>8} {'load s':>7} {'TTFT s':>7} "
        f"{'prompt tok/s':>13} {'decode tok/s':>13} {'perplexity':>11}"
    )
    for name, method, size, load, ttft, ptps, dtps, ppl in rows:
        ppl_text = f"{ppl:.2f}" if ppl else "-"
        print(
            f"{name:<12} {method:<12} {size:>8.1f} {load:>7.2f} {ttft:>7.3f} {ptps:>13.1f} "
            f"{dtps:>13.1f} {ppl_text:>11}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
