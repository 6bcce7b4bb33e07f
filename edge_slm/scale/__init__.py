"""Scoring large tables of texts with a bundle, on one machine or on a Ray cluster.

* :mod:`edge_slm.scale.tasks`: :class:`TaskSpec` (what to compute per row) and
  :class:`RowScorer` (one loaded bundle: texts in, one result dict per row out, a bad row
  turned into an ``error`` field instead of failing its batch);
* :mod:`edge_slm.scale.tables`: reading and writing JSONL, CSV and Parquet rows;
* :mod:`edge_slm.scale.blocks`: a resumable job over a file, in blocks of rows written
  atomically (``edge-slm batch``);
* :mod:`edge_slm.scale.ray_data`: the same scorer as a Ray Data ``map_batches`` transform
  (``pip install 'edge-slm[ray]'``).

Nothing here is imported by the rest of the runtime, and only ``ray_data`` (and Parquet
files) need the ``ray`` extra: the local path runs on numpy, onnxruntime and tokenizers.
"""
