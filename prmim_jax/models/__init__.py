"""Flax models: the ViT encoder and the MAE / partial / PR-MIM reconstruction models."""
