"""Image embedders (EfficientNet-Lite0, OpenCLIP ViT), image folders, and embeddings on disk.

See :mod:`rtdecoder.embedding.base` for the interface and the ``image_range`` convention,
:mod:`rtdecoder.embedding.images` for a folder of ``<stim_id>.<ext>`` images and its content hash,
and :mod:`rtdecoder.embedding.cache` for the embedding cache and the embeddings-file format
(``ids`` + ``tokens`` + ``embedder``) that candidates and calibration read.
"""
