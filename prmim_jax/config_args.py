"""Names given in configs and on the command line: typed config arguments, and the closest known name to a typo.

An experiment config takes one string argument (``configs/<name>.py:runlocal,throw=0.25``). ``parse``
reads it against the config's own declaration of what it takes, as big_vision's ``parse_arg`` does::

    options = config_args.parse(arg, runlocal=False, throw=0.5, steps=int, sampler=str)
    options.runlocal, options.throw, options.steps  # False / True, a float, an int or None

A name the config does not declare is refused with the closest declared one, as an unknown config key is
(``unknown_key_message``): ``:runloacl`` never silently launches the full job.
"""

from __future__ import annotations

import difflib

import ml_collections
from ml_collections import config_dict


def closest(name: str, known) -> str | None:
    """The known name most like ``name`` (a typo's intended name), or None when none is close."""
    matches = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


# Top-level keys of earlier configs and where they are now (methods as plug-ins: evaluators live in config.evals;
# ``eval`` was a classifier config's section).
MOVED_KEYS = {"picture_every": "evals.reconstruction.every", "knn": "evals.knn", "eval": "evals.accuracy"}


def unknown_key_message(path: str, key: str, known, rest: str = "") -> str:
    """One line for a config key that ``path`` (a section, '' for the top level) does not have: where it moved
    (``MOVED_KEYS``; ``rest``, the override's path below ``key`` such as ``'.k'``, is kept), else the closest key."""
    full = f"{path}.{key}" if path else key
    if not path and key in MOVED_KEYS:
        return f"config key {key + rest!r} has moved: set --config.{MOVED_KEYS[key]}{rest} instead."
    match = closest(key, known)
    hint = f"did you mean --config.{path + '.' if path else ''}{match}? " if match else ""
    return f"unknown config key {full!r}: {hint}{path or 'the top level'} has {', '.join(sorted(known))}."


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


def optional_strings(*names: str, **values) -> ml_collections.ConfigDict:
    """A config section of optional string keys, None until set (``values`` sets some), typed so that
    ``--config.<section>.<name>=...`` can set them on the command line."""
    section = ml_collections.ConfigDict({name: config_dict.placeholder(str) for name in names})
    section.update(values)
    return section


def _convert(name: str, text, kind: type):
    if kind is bool:
        if text is True or str(text).lower() in ("1", "true", "yes"):
            return True
        if str(text).lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"config argument {name}={text!r} is a flag: give it as '{name}' (or {name}=true|false).")
    if text is True:
        raise ValueError(f"config argument {name!r} needs a value: {name}=<{_TYPE_NAMES.get(kind, kind.__name__)}>.")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"config argument {name}={text!r} must be {_TYPE_NAMES.get(kind, kind.__name__)}.") from None


def parse(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """``arg`` (``"runlocal,method=mae,throw=0.25"``) read against ``spec``, the arguments a config takes.

    ``spec`` maps each name to its default, whose type converts the given text (``False`` declares a flag,
    given bare: ``runlocal``), or to a type (``int``, ``float``, ``str``: no default, None unless given).
    Returns every declared name with its value. Raises ``ValueError`` naming the closest declared name for
    an undeclared one, and the expected type for a value that does not convert.
    """
    values = {name: None if isinstance(default, type) else default for name, default in spec.items()}
    for item in filter(None, (arg or "").split(",")):
        name, equals, text = (part.strip() for part in item.partition("="))
        if name not in spec:
            match = closest(name, spec)
            hint = f"did you mean {match!r}? " if match else ""
            raise ValueError(
                f"unknown config argument {name!r}: {hint}this config takes {', '.join(sorted(spec)) or 'none'}."
            )
        default = spec[name]
        kind = default if isinstance(default, type) else type(default)
        values[name] = _convert(name, text if equals else True, kind)
    return ml_collections.ConfigDict(values)
