"""``python -m edge_slm_quantize BUNDLE OUT_DIR --method int4-search|int8|...`` (same as ``edge-slm quantize``)."""

from edge_slm_quantize.cli import main

raise SystemExit(main())
