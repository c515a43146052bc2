"""Reconstruction targets that a method computes on the device from the augmented, normalised images.

One module per kind of target (``hog``: LocalMIM's multi-scale histograms of
oriented gradients). Targets carry no gradient and no parameters.
"""
