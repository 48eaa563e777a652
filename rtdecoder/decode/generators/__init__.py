"""Generators: image tokens -> images (phantom pixel-space UNet, MindEye2 SDXL unCLIP) and
few-step distilled students. They share the :class:`~rtdecoder.decode.generators.base.Generator`
interface."""
