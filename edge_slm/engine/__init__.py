"""onnxruntime underneath every model: session options and the prepared-session cache.

* :mod:`edge_slm.engine.session`: threads, spinning and :class:`LoadOptions`; opening
  a graph on the CPU execution provider;
* :mod:`edge_slm.engine.prepared_cache`: optimized graphs and pre-packed weights kept on
  disk, so a second load skips that work.
* :mod:`edge_slm.engine.block_offsets`: a cache entry's GGUF block offsets folded into
  its pre-packed weights (fewer nodes per decode step), verified before it is kept.
"""
