"""``python -m quantize BUNDLE OUT_DIR --method int4|int8`` (same as ``edge-slm quantize``)."""

from quantize.cli import main

raise SystemExit(main())
