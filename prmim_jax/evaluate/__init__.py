"""Evaluation: kNN accuracy of encoder features, reconstruction pictures."""
