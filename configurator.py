"""nanoGPT-style configuration: a script's defaults, then config files, then --key=value overrides.

    python train.py config/rot5_mini.py --batch_size=640 --compile=True

Each argument that does not start with "--" is a config file of plain Python assignments, exec'd in order;
then each "--key=value" overrides one key, wherever it stands on the command line. Every key must already
have a default (a typo is an error that lists the valid keys, not a silently ignored setting), and every
value must have the default's type, so `--epochs=two` or `--batch_size=0.5` fail at start-up instead of hours
into a run. `check_ranges` then rejects values of the right type but out of range (`--log_interval=0`).
"""
from __future__ import annotations

import ast
import difflib
import math
import os
import types


def configure(defaults: dict, argv: list[str]) -> dict:
    """defaults (key -> value) updated by the config files and --key=value overrides in argv; returns a new dict."""
    config = dict(defaults)
    for arg in (a for a in argv if not a.startswith("--")):
        for key, value in read_config_file(arg).items():
            _check_key(key, defaults, arg)
            config[key] = _checked(key, value, defaults[key], arg)
    for arg in (a for a in argv if a.startswith("--")):
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise SystemExit(f"cannot parse {arg!r}: write overrides as --key=value (e.g. --batch_size=64)")
        _check_key(key, defaults, arg)
        config[key] = _checked(key, _parse(text, defaults[key]), defaults[key], arg)
    return config


def check_ranges(config: dict, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 fractions: tuple[str, ...] = ()) -> None:
    """One-line errors for keys that must be > 0, >= 0, or in [0, 1)."""
    for keys, ok, rule in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                           (fractions, lambda v: 0 <= v < 1, "in [0, 1)")):
        for key in keys:
            if not ok(config[key]):
                raise SystemExit(f"--{key}={config[key]!r} must be {rule}")


def read_config_file(path: str) -> dict:
    """The names a config file assigns. Leading-underscore names, imports and functions are its own helpers."""
    if not os.path.isfile(path):
        raise SystemExit(f"config file {path} does not exist: pass a file like config/rot5_mini.py, or --key=value overrides")
    namespace: dict = {}
    with open(path) as f:
        source = f.read()
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:  # a typo in a config file is the user's to fix: say where, without a traceback
        where = f"{path}:{e.lineno}" if isinstance(e, SyntaxError) else path
        raise SystemExit(f"config file {where} does not run ({type(e).__name__}: {e}): fix it") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, types.ModuleType) and not callable(v)}


def _parse(text: str, default):
    """A Python literal (64, 5e-4, True, "x"); for a string key any unparsable or non-string text is the string itself."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return text if isinstance(default, str) and not isinstance(value, str) else value


def _check_key(key: str, defaults: dict, source: str) -> None:
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SystemExit(f"unknown config key {key!r} in {source}{hint}; valid keys: {', '.join(sorted(defaults))}")


INT64 = 2 ** 63  # ints become torch / numpy int64 values (sizes, counts, seeds): larger ones overflow there


def _checked(key: str, value, default, source: str):
    # An int where a float is expected is fine (--learning_rate=1 is 1.0); a bool is never an int here.
    if isinstance(default, float) and type(value) is int:
        value = float(value) if abs(value) < 2 ** 1024 else math.inf  # (float() overflows past the float range)
    if type(value) is not type(default):
        raise SystemExit(f"config key {key} must be {type(default).__name__} like its default {default!r}, "
                         f"got {value!r} ({type(value).__name__}) from {source}")
    # 1e400 parses as inf, and nan is a float: no setting means either, and they would surface as an
    # OverflowError or a run of NaN losses far from the setting that caused them
    if isinstance(value, float) and not math.isfinite(value):
        raise SystemExit(f"config key {key} is {value!r} (from {source}): it must be a finite number")
    if isinstance(value, int) and not -INT64 <= value < INT64:
        raise SystemExit(f"config key {key}={value} (from {source}) is out of range: its size must be below 2**63")
    return value
