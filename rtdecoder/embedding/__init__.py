"""Image embedders (EfficientNet-Lite0, OpenCLIP ViT) and the on-disk embedding cache.

See :mod:`rtdecoder.embedding.base` for the interface and the ``image_range`` convention.
"""
