"""nanoGPT-style configuration: a script's defaults, then config files, then --key=value overrides.

    python train.py config/rot5_mini.py --batch_size=640 --compile=True

Each argument that does not start with "--" is a config file of plain Python assignments, exec'd in order;
then each "--key=value" overrides one key, wherever it stands on the command line. Every key must already
have a default (a typo is an error that lists the valid keys, not a silently ignored setting), and every
value must have the default's type, so `--epochs=two` or `--batch_size=0.5` fail at start-up instead of hours
into a run. `check_ranges` then rejects values of the right type but out of range (`--log_interval=0`).
`--help` (help_text) lists every key with its value and its line, read off the defaults' source (documented_keys).
"""
from __future__ import annotations

import ast
import difflib
import io
import math
import os
import textwrap
import tokenize
import types
from typing import NamedTuple


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


def given_keys(argv: list[str]) -> set[str]:
    """The keys that argv's config files and --key=value overrides set, whatever their values (configure's result
    cannot tell a key set to its default from one left alone): train.py --init_from takes every model key the
    run does not set from its source."""
    keys: set[str] = set()
    for arg in argv:
        keys |= {arg[2:].partition("=")[0]} if arg.startswith("--") else read_config_file(arg).keys()
    return keys


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


# -- --help: every key, its default and its line, read off the defaults' own source ---------------------------

GROUPS = ("data", "model", "optimization", "schedule", "system")  # the order --help lists them in


class Key(NamedTuple):
    name: str
    group: str    # one of GROUPS
    title: str    # the group's comment line ("optimization: AdamW with ...")
    help: str     # the key's trailing comment (and the comment lines under it)


def documented_keys(path: str, names, scope: str | None = None, group: str = "") -> list[Key]:
    """The keys `names` as the source file `path` defines them, in its order: each key's help is the comment
    at the end of its line plus any comment-only lines under it indented past the key; its group is the last
    comment-only line at the key's own indentation above it ("# data", "# optimization: ..."), or `group`.
    Where: module-level assignments (scope None), the fields of the class `scope`, or the keyword arguments of
    the call assigned to `scope` (DEFAULTS = dict(...)).
    One place, the defaults themselves, so --help cannot drift from them."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    comments = {t.start[0]: (t.start[1], t.string.lstrip("#").strip())
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    code_lines = {i + 1 for i, line in enumerate(source.splitlines()) if line.strip() and not line.lstrip().startswith("#")}
    found: dict[str, tuple[int, int]] = {}  # name -> (line, column)
    for node in ast.parse(source).body:
        if scope is None and isinstance(node, ast.Assign):
            found.update({t.id: (node.lineno, node.col_offset) for t in node.targets if isinstance(t, ast.Name)
                          and t.id in names and t.id not in found})
        elif isinstance(node, ast.ClassDef) and node.name == scope:
            found.update({n.target.id: (n.lineno, n.col_offset) for n in node.body
                          if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id in names})
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call) and \
                any(isinstance(t, ast.Name) and t.id == scope for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
            found.update({k.arg: (k.lineno, k.col_offset) for k in node.value.keywords if k.arg in names})
    keys, previous, title = [], 0, group
    for name, (line, column) in sorted(found.items(), key=lambda item: item[1]):
        for at in range(previous + 1, line):  # a group comment between the last key and this one
            if at in comments and at not in code_lines and comments[at][0] == column:
                title = comments[at][1]
        text, at = [comments[line][1]] if line in comments and comments[line][0] > column else [], line + 1
        while at in comments and at not in code_lines and comments[at][0] > column:
            text.append(comments[at][1])
            at += 1
        previous = at - 1
        keys.append(Key(name, title.split(":")[0].strip().split()[0] if title else "", title,
                        " ".join(text)))
    return keys


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def help_text(usage: str, about: str, keys: list[Key], defaults: dict, argv: list[str]) -> str:
    """--help: usage, then every key as --key=value (its value after the config files and overrides in argv)
    with its line, grouped in GROUPS order."""
    given = [a for a in argv if not wants_help([a])]
    config = configure(defaults, given)
    lines = [usage, "", about, "",
             "Config files (plain Python assignments) are read in order, then --key=value overrides, wherever they "
             "stand; a value must have its default's type.",
             f"Values shown: the defaults{', then ' + ' '.join(given) if given else ''}."]
    width = min(40, max(len(_shown(k.name, config[k.name])) for k in keys))
    for group in GROUPS:
        members = [k for k in keys if k.group == group]
        titles = list(dict.fromkeys(k.title for k in members))
        if not members:
            continue
        lines += ["", "; ".join(titles) + ":"]
        for k in members:
            lines.append(textwrap.fill(k.help, 118, initial_indent=f"  {_shown(k.name, config[k.name]):<{width}}  ",
                                       subsequent_indent=" " * (width + 4)))
    return "\n".join(lines)


def _shown(name: str, value) -> str:
    """--key=value as one would type it: strings bare unless they need quotes."""
    text = value if isinstance(value, str) and value and not any(c.isspace() for c in value) else repr(value)
    return f"--{name}={text}"
