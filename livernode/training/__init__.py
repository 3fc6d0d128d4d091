"""Offline half: datasets, the segmentation-models network, the training loop, evaluation and plots."""
