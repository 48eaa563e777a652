"""Shipped configuration presets (YAML), installed as ``rtdecoder.presets``."""
