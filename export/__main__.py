"""``python -m export SOURCE OUT_DIR`` (same as ``edge-slm export``)."""

from export.cli import main

raise SystemExit(main())
