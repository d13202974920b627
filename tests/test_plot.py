"""Curves and trackers: train.py and finetune.py redraw out_dir/curves.png at every evaluation, plot.py
overlays runs, a missing matplotlib is one line and training goes on; TensorBoard's event file and the W&B
offline run file, read back, hold the numbers of metrics.jsonl; a tracker whose package is missing is one
line before anything is made."""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import finetune  # noqa: E402
import plot  # noqa: E402
import prepare  # noqa: E402
import train  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
FINETUNE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config",
                               "finetune_sample_cpu.py")
# a tiny model for 4 steps of 4 real stories, evaluated at steps 0, 2 and 4: seconds on one core
TINY = ["--dataset=mine", "--device=cpu", "--d_model=32", "--n_heads=2", "--head_dim=16", "--n_kv_heads=2",
        "--d_ff=64", "--n_encoder_layers=1", "--n_decoder_layers=1", "--encoder_len=64", "--decoder_len=32",
        "--batch_size=4", "--micro_batch_size=4", "--epochs=0.15", "--eval_docs=4", "--eval_batch_size=16",
        "--eval_interval=2", "--log_interval=1", "--dtype=float32"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working directory with data/mine (120 real stories as JSON Lines, 10% held out) and data/sample_instruct."""
    d = tmp_path_factory.mktemp("plot")
    with open(os.path.join(prepare.SAMPLE_DIR, "stories.txt"), encoding="utf-8") as f:
        stories = [r.strip() for r in f.read().split(prepare.EOT.decode()) if r.strip()][:120]
    with open(d / "c.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": s}) + "\n" for s in stories)
    cwd = os.getcwd()
    os.chdir(d)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare.prepare_corpus("jsonl", ["c.jsonl"], "data/mine", val_fraction=0.1, workers=1)
        prepare.prepare("sample_instruct", "data/sample_instruct", workers=1)
    yield d
    os.chdir(cwd)


def events(run: str, kind: str) -> list[dict]:
    return [e for e in plot.read_metrics(run) if e["event"] == kind]


def test_curves_at_every_evaluation_and_overlaid(work, real_curves, monkeypatch, capsys):
    drawn = []
    monkeypatch.setattr(plot, "draw", lambda runs, path, real=plot.draw: drawn.append(path) or real(runs, path))
    train.main(TINY + ["--out_dir=out/a"])
    assert [e["step"] for e in events("out/a", "eval")] == [0, 2, 4]
    assert drawn == [os.path.join("out/a", "curves.png")] * 3  # one redraw per evaluation
    with open("out/a/curves.png", "rb") as f:
        assert f.read(8) == PNG
    finetune.main([FINETUNE_CONFIG, "--init_from=out/a/ckpt.pt", "--out_dir=out/f", "--encoder_len=64",
                   "--decoder_len=16", "--epochs=1.0", "--eval_interval=1", "--device=cpu"])
    assert len(drawn) == 3 + len(events("out/f", "eval")) and os.path.exists("out/f/curves.png")
    # plot.py overlays the runs: a pre-training and a fine-tuning (no tokens: the x axis is the step)
    assert plot.main(["out/a", "out/f", "--out", "both.png"]) == "both.png"
    with open("both.png", "rb") as f:
        assert f.read(8) == PNG
    with pytest.raises(SystemExit, match="out/none/metrics.jsonl does not exist: pass the out_dir of a train.py"):
        plot.main(["out/none"])


def test_without_matplotlib_one_line_and_training_goes_on(work, real_curves, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure -> ImportError
    result = train.main(TINY + ["--out_dir=out/m"])
    assert result["max_steps"] == 4 and not os.path.exists("out/m/curves.png")
    notes = [line for line in capsys.readouterr().out.splitlines() if "matplotlib" in line]
    assert notes == ["note: matplotlib is not installed, so no out/m/curves.png (pip install matplotlib); training "
                     "goes on"]
    with pytest.raises(SystemExit, match="plot.py needs matplotlib: pip install matplotlib"):
        plot.main(["out/m"])


def wandb_history(run_file: str) -> list[dict]:
    """The history rows of a W&B run file (LevelDB-style log: 7-byte file header, then records framed as
    crc32 (4), length (2, little-endian), type (1: full, 2-4: first / middle / last) in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    with open(run_file, "rb") as f:
        data = f.read()
    rows, pos, block, part = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4) and part:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            part = b""
    return rows


def test_tensorboard_and_wandb_hold_the_logged_numbers(work, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.main(TINY + ["--out_dir=out/t", "--tensorboard_log=True", "--wandb_log=True", "--wandb_run_name=tiny"])
    logged = events("out/t", "train")
    evals = events("out/t", "eval")
    board = EventAccumulator("out/t/tensorboard")
    board.Reload()
    assert [(s.step, s.value) for s in board.Scalars("train/loss")] == \
        [(e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in logged]
    assert [s.step for s in board.Scalars("eval/continuation_loss")] == [0, 2, 4]
    rows = wandb_history(glob.glob("out/t/wandb/offline-run-*/run-*.wandb")[0])
    assert [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r] == [(e["step"], e["loss"]) for e in logged]
    assert [r["eval/val_loss"] for r in rows if "eval/val_loss" in r] == [e["val_loss"] for e in evals]


@pytest.mark.parametrize("key, package", [("wandb_log", "wandb"), ("tensorboard_log", "tensorboard")])
def test_a_missing_tracker_is_one_line_before_anything_is_made(work, monkeypatch, key, package):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(SystemExit, match=rf"^--{key}=True needs the {package} package: pip install {package} "):
        train.main(TINY + [f"--out_dir=out/{key}", f"--{key}=True"])
    assert not os.path.exists(f"out/{key}")
    with pytest.raises(SystemExit, match=rf"^--{key}=True needs the {package} package"):
        finetune.main([f"--{key}=True", f"--out_dir=out/{key}"])
