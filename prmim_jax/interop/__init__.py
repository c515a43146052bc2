"""Interoperability with other codebases' checkpoints: official MAE / timm weights in and out (PyTorch files)."""
