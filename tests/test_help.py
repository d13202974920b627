"""--help of train.py, finetune.py and sample.py: every key with its value and a line, grouped, read off the defaults'
own source (so it cannot drift from them); --chinchilla anywhere on the command line."""
from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import finetune  # noqa: E402
import model  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from configurator import GROUPS, _shown, configure, documented_keys  # noqa: E402


def listed(text: str) -> dict[str, str]:
    """{key: the rest of its line} from --help's output."""
    return {m.group(1): m.group(0) for m in re.finditer(r"^  --(\w+)=.*$", text, re.M)}


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["config/sample_cpu.py", "--help", "--batch_size=8"]])
def test_train_help_lists_every_key_with_its_value_and_a_line(capsys, argv, monkeypatch):
    monkeypatch.chdir(REPO)
    assert train.main(argv) == {}
    out = capsys.readouterr().out
    defaults = {**train.TRAIN_DEFAULTS, **asdict(model.ROT5Config())}
    config = configure(defaults, [a for a in argv if a not in ("-h", "--help")])
    lines = listed(out)
    assert set(lines) == set(defaults)
    for key, line in lines.items():
        assert line.startswith(f"  {_shown(key, config[key])} ") and len(line.split(None, 1)[1]) > 10, line
    headers = [h.split(":")[0] for h in re.findall(r"^(\w[^\n]*):$", out, re.M)]
    assert headers == list(GROUPS)  # data, model, optimization, schedule, system, in that order
    if "config/sample_cpu.py" in argv:
        assert "--dataset=sample " in out and "--batch_size=8 " in out and "then config/sample_cpu.py --batch_size=8" in out


def test_finetune_help_lists_every_key(capsys):
    assert finetune.main(["--help"]) == {}
    lines = listed(capsys.readouterr().out)
    assert set(lines) == set(finetune.DEFAULTS)
    assert lines["init_from"].startswith("  --init_from=out/rot5_mini/ckpt.pt ")


def test_every_key_is_documented_in_one_place():
    """Each key has a group and a line, read off the comment beside its default (model.py's ROT5Config too)."""
    model_defaults = asdict(model.ROT5Config())
    for keys, names in ((documented_keys(train.__file__, train.TRAIN_DEFAULTS), train.TRAIN_DEFAULTS),
                        (documented_keys(finetune.__file__, finetune.DEFAULTS, scope="DEFAULTS"), finetune.DEFAULTS)):
        assert [k.name for k in keys] == [n for n in names if n in {k.name for k in keys}] and len(keys) == len(names)
        assert all(k.group in GROUPS and k.help for k in keys), [k for k in keys if not (k.group in GROUPS and k.help)]
    bare = documented_keys(model.__file__, model_defaults, scope="ROT5Config", group="model")
    assert {k.name for k in bare} == set(model_defaults)
    assert all(k.help for k in bare), [k.name for k in bare if not k.help]   # model.py comments every field


@pytest.mark.parametrize("argv", [["--chinchilla=1.37e9"], ["config/sample_cpu.py", "--chinchilla", "1.37e9"],
                                  ["--batch_size=8", "--chinchilla=1.37e9"]])
def test_chinchilla_anywhere(capsys, argv, monkeypatch):
    monkeypatch.chdir(REPO)
    assert train.main(argv) == {}
    assert "N_opt = 48.0M parameters" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="usage: python train.py --chinchilla=TOKENS"):
        train.main(argv[:-1] + ["--chinchilla=lots"])


def test_sample_help_has_a_line_for_every_option_and_shows_defaults(capsys):
    parser = sample.build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help and len(a.help) > 10 for a in options), [a.dest for a in options if not a.help]
    with pytest.raises(SystemExit) as e:
        sample.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for a in options:
        assert a.option_strings[0] in out
        if a.default not in (None, False):  # "not given" defaults are explained in the line itself
            assert f"(default: {a.default})" in out, a.dest
    assert "(default: out/sample_cpu/ckpt.pt)" in out and "(default: None)" not in out
