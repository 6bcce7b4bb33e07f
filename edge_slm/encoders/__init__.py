"""Encoder bundles: text classification and embeddings over one onnxruntime session.

* :mod:`edge_slm.encoders.encoder`: tokenizing, batching and running the encoder graph;
* :mod:`edge_slm.encoders.classify`: :class:`TextClassifier`;
* :mod:`edge_slm.encoders.embed`: :class:`TextEmbedder` and :class:`CosineIndex`.
"""
