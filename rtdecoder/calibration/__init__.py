"""Offline work on a calibration session: single-trial betas, pretraining, fine-tuning, bundles."""
