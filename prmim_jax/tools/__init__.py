"""Command-line and library tools: checkpoint import/export, cost and gradient analyses."""
