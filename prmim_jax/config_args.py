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


def throwing(options: dict) -> dict:
    """Method-section overrides from ``sampler=`` and ``throw=`` (rho_d), the ones given."""
    overrides = {}
    if "sampler" in options:
        overrides["sampler"] = options["sampler"]
    if "throw" in options:
        overrides["throw_ratio"] = float(options["throw"])
    return overrides


def method(options: dict) -> ml_collections.ConfigDict:
    """The method section from ``method=`` (default ``prmim``), ``sampler=`` and ``throw=``: the named
    method's defaults (``methods.method_config``) with the sampler and throwing ratio given."""
    return methods.method_config(options.get("method", "prmim"), **throwing(options))
