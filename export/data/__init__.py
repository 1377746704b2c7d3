"""Datasets and augmentations for training."""
