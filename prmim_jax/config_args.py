"""The ``:arg`` string of experiment configs (``configs/<name>.py:key=value,flag``), shared by them."""

from __future__ import annotations

import ml_collections

from prmim_jax import methods


def parse(arg: str | None) -> dict:
    """``"runlocal,method=mae,throw=0.25"`` -> ``{"runlocal": True, "method": "mae", "throw": "0.25"}``."""
    options = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        options[key.strip()] = value.strip() or True
    return options


def method(options: dict, throw_ratio: float = 0.5) -> ml_collections.ConfigDict:
    """The method section from ``method=``, ``sampler=`` and ``throw=`` (PR-MIM with furthest sampling by default)."""
    name = options.get("method", "prmim")
    config = methods.method_config(name, sampler=options.get("sampler", "random" if name == "mae" else "furthest"))
    if name != "mae":
        config.throw_ratio = float(options.get("throw", throw_ratio))
    return config
