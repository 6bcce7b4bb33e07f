"""``python -m edge_slm`` runs the ``edge-slm`` command."""

from edge_slm.cli.main import main

raise SystemExit(main())
