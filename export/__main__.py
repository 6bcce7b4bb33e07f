"""``python -m edge_slm_export SOURCE OUT_DIR`` (same as ``edge-slm export``)."""

from edge_slm_export.cli import main

raise SystemExit(main())
