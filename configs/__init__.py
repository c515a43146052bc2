"""Experiment configs (``get_config(arg)``); ``common`` holds what they share. A package so they can import it."""
