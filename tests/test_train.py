"""train.py, configurator.py, checkpoint.py on the real bundled sample (data/sample, TinyStories) with a tiny
model. Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_train.py"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (test_faults.flip_bytes)

import checkpoint  # noqa: E402
import prepare  # noqa: E402
import train  # noqa: E402
from batch import Batch, label_positions  # noqa: E402
from model import ROT5, ROT5Config  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402
from ul2 import UL2Batches, continuation_batches  # noqa: E402

# A tiny RoPE + GQA model and short windows: every run below takes seconds on one CPU core. fp32 whatever the
# CPU (dtype=auto would pick bf16 on AMX CPUs): the tolerances below are fp32's.
TINY = ["--dataset=sample", "--device=cpu", "--d_model=64", "--n_heads=2", "--head_dim=32", "--n_kv_heads=1",
        "--d_ff=128", "--n_encoder_layers=2", "--n_decoder_layers=2", "--position=rope", "--encoder_len=128",
        "--decoder_len=64", "--eval_docs=32", "--eval_batch_size=32", "--log_interval=1", "--dtype=float32"]


@pytest.fixture(scope="module", autouse=True)
def sample_data(tmp_path_factory, short_val_sample):
    """work/data/sample/ from the bundled stories, validating on 64 of the genuine validation stories (conftest)."""
    work = tmp_path_factory.mktemp("train")
    cwd = os.getcwd()
    os.chdir(work)  # train.py reads data/<dataset> relative to the working directory, as nanoGPT
    with contextlib.redirect_stdout(io.StringIO()):
        prepare.prepare("sample", out_dir=os.path.join("data", "sample"), workers=1)
    yield prepare.load_meta(os.path.join("data", "sample"))
    os.chdir(cwd)


def steps_arg(meta: dict, steps: int, batch_size: int) -> str:
    """--epochs giving exactly `steps` optimizer steps of batch_size documents (train.py rounds up)."""
    return f"--epochs={(steps * batch_size - 0.5) / meta['splits']['train']['documents']!r}"


def events(out_dir, kind: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [e for e in map(json.loads, f) if e["event"] == kind]


def params(out_dir) -> dict[str, torch.Tensor]:
    return checkpoint.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["model"]


def assert_same_params(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"parameters differ by up to {worst:.3g}"


# ---------------------------------------------------------------------------------------------------------
# Training


def test_loss_falls_on_the_sample(tmp_path, sample_data):
    out = tmp_path / "run"
    result = train.main(TINY + [f"--out_dir={out}", steps_arg(sample_data, 20, 8), "--batch_size=8",
                                "--micro_batch_size=8", "--learning_rate=6e-3", "--eval_interval=10"])
    val = events(out, "eval")
    assert [e["step"] for e in val] == [0, 10, 20]
    assert val[0]["val_loss"] > val[1]["val_loss"] > val[2]["val_loss"]
    assert val[2]["val_loss"] < val[0]["val_loss"] - 1.0, val  # 11.0 -> 9.5 (measured)
    trained = events(out, "train")
    assert len(trained) == 20 and trained[-1]["loss"] < trained[0]["loss"] - 1.0 and trained[-1]["lr"] > 0
    assert all(e["aux_loss"] == 0 and e["z_loss"] == 0 and e["mfu"] is None for e in trained)  # dense, CPU
    # the continuation loss (first half of a validation story -> second half) and each UL2 mode's loss fall too
    assert val[0]["continuation_loss"] > val[1]["continuation_loss"] > val[2]["continuation_loss"]
    for m in "RXS":
        assert val[0][f"val_loss_{m}"] > val[2][f"val_loss_{m}"]
    full = events(out, "eval_full")
    assert full[0]["docs"] == sample_data["splits"]["val"]["documents"]
    assert result["full_val_loss"] == full[0]["val_loss"]
    assert result["full_continuation_loss"] == full[0]["continuation_loss"]
    assert result["full_val_loss_S"] == full[0]["val_loss_S"]
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["kind"] == "pretrain" and ckpt["step"] == 20 and ckpt["tokenizer"] == "mistral"
    # tokens: raw document tokens (before corruption), 8 documents of ~210 tokens per step
    assert ckpt["metrics"]["tokens"] == trained[-1]["tokens"]
    assert 20 * 8 * 100 < ckpt["metrics"]["tokens"] < 20 * 8 * 400


PREEMPTED_WORKER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import preempt, train
from model import ROT5

forward, calls = ROT5.forward, []

def forward_then_sigterm(self, *args, **kwargs):
    calls.extend([1] if self.training else [])
    if len(calls) == 2 and os.environ["RANK"] == "0":  # step 2 (1 micro-batch per step): SIGTERM to torchrun,
        os.kill(os.getppid(), signal.SIGTERM)            # which sends it on to both workers
        deadline = time.monotonic() + 60
        while not preempt._active.signal and time.monotonic() < deadline:  # (so that it arrives in this step)
            time.sleep(0.01)
    return forward(self, *args, **kwargs)

ROT5.forward = forward_then_sigterm
sys.argv[0] = train.__file__
train.main(sys.argv[1:])
"""


def test_two_processes_equal_one_with_accumulation(tmp_path, sample_data):
    """Same global batch, split 2 ranks x 1 micro-step (gloo DDP) or 1 rank x 2 micro-steps: same examples,
    same dropout, same update -- up to fp32 rounding, which differs because gloo's all-reduce and local
    accumulation add the gradients in another order (and another CPU, SIMD width or thread count rounds every
    kernel differently). The bounds below follow from that arithmetic, not from one machine's print-out:

    - loss and gradient norm: each is a sum of O(1e4) fp32 terms, so reordering moves it by far less than
      1e-5 relative (unit roundoff 6e-8; measured ~1e-7). A wrong accumulation divisor moves the gradient norm
      by 2x, a skipped micro-batch or a missing all-reduce the loss and norm by ~10-30%.
    - parameters: AdamW normalises each gradient coordinate, so every coordinate moves by about lr per step
      whatever its gradient's size, and a rounding change in g moves the update by ~lr * |dg / g|: negligible
      except for the rare coordinates whose gradient is within rounding of 0, where the step may even flip
      sign (up to 2 lr). So no max-abs bound holds on every CPU; the root-mean-square difference over all
      coordinates does: measured 4e-5 x the summed learning rates S with other SIMD kernels
      (ATEN_CPU_CAPABILITY=default, MKL SSE4_2), ~0.8 S when a rank's micro-batch is lost (94% of the
      coordinates then differ by over 0.1 S). 1e-2 S sits two orders of magnitude from both.
    """
    args = TINY + [steps_arg(sample_data, 3, 8), "--batch_size=8", "--micro_batch_size=4", "--eval_interval=100",
                   "--learning_rate=3e-3"]
    train.main(args + [f"--out_dir={tmp_path / 'one'}"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(REPO, "train.py"), *args, f"--out_dir={tmp_path / 'two'}"],
                          env=env, capture_output=True, text=True, timeout=300)  # in the fixture's directory
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout + proc.stderr
    one, two = events(tmp_path / "one", "train"), events(tmp_path / "two", "train")
    assert [(e["tokens"], e["lr"]) for e in one] == [(e["tokens"], e["lr"]) for e in two]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    a, b = params(tmp_path / "one"), params(tmp_path / "two")
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    lr_sum = sum(e["lr"] for e in one)
    assert diff.pow(2).mean().sqrt().item() <= 1e-2 * lr_sum, f"parameters differ by RMS {diff.pow(2).mean().sqrt():.3g}"
    assert events(tmp_path / "one", "eval_full")[0]["val_loss"] == \
        pytest.approx(events(tmp_path / "two", "eval_full")[0]["val_loss"], rel=1e-5)

    # SIGTERM to torchrun during step 2 (as SLURM or Kubernetes send it): both workers finish the step and stop
    # after it, rank 0 saving a checkpoint at step 2; the same torchrun command with --resume=True then makes
    # step 3 exactly as the uninterrupted 2-process run did.
    worker = tmp_path / "worker.py"
    worker.write_text(PREEMPTED_WORKER.format(repo=REPO))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = tmp_path / "preempted"
    stopped = subprocess.run([*torchrun, str(worker), *args, f"--out_dir={out}"], env=env, capture_output=True,
                             text=True, timeout=300)
    line = f"stopped by SIGTERM after step 2: saved {out / 'ckpt.pt'} at that step; continue with the same command and --resume=True"
    assert stopped.returncode != 0 and stopped.stderr.count(line) == 1, stopped.stderr[-3000:]
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["step"] == 2
    resumed = subprocess.run([*torchrun, os.path.join(REPO, "train.py"), *args, f"--out_dir={out}", "--resume=True"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["step"] for e in events(out, "train")] == [1, 2, 3]
    assert [(e["loss"], e["tokens"]) for e in events(out, "train")] == [(e["loss"], e["tokens"]) for e in two]
    assert events(out, "eval") == events(tmp_path / "two", "eval")
    assert_same_params(params(out), params(tmp_path / "two"), atol=0.0)


class Crash(Exception):
    pass


def six_steps(meta: dict) -> list[str]:
    """6 steps of 4 documents in micro-batches of 2, evaluated (and saved) at steps 3 and 6, saved at 2 and 4 too
    (save_interval: a save changes nothing in the run)."""
    return TINY + [steps_arg(meta, 6, 4), "--batch_size=4", "--micro_batch_size=2", "--eval_interval=3",
                   "--save_interval=2", "--learning_rate=3e-3"]


@pytest.fixture(scope="module")
def straight(sample_data, tmp_path_factory) -> str:
    """six_steps, uninterrupted: what an interrupted and resumed run must equal."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    train.main(six_steps(sample_data) + [f"--out_dir={out}"])
    return out


def test_resume_continues_the_same_run(tmp_path, sample_data, monkeypatch, straight):
    args = six_steps(sample_data)

    # the same run, killed right after its step-3 checkpoint (having logged nothing later), then resumed
    real_save = train.save_checkpoint

    def save_then_crash(path, obj):
        real_save(path, obj)
        if obj["step"] == 3:
            raise Crash

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train.main(args + [f"--out_dir={tmp_path / 'resumed'}"])
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert checkpoint.load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"))["step"] == 3
    train.main(args + [f"--out_dir={tmp_path / 'resumed'}", "--resume=True"])

    assert_same_run(straight, tmp_path / "resumed")


def assert_same_run(straight, resumed) -> None:
    """The resumed run logged every step once, with the uninterrupted run's losses, and ends with its weights."""
    a, b = events(straight, "train"), events(resumed, "train")
    assert [e["step"] for e in b] == [1, 2, 3, 4, 5, 6]  # no step lost or logged twice
    assert [(e["loss"], e["tokens"], e["lr"]) for e in a] == [(e["loss"], e["tokens"], e["lr"]) for e in b]
    assert events(straight, "eval") == events(resumed, "eval")
    assert_same_params(params(straight), params(resumed), atol=0.0)


def test_sigterm_mid_run_saves_that_step_and_resuming_equals_the_uninterrupted_run(tmp_path, sample_data, monkeypatch,
                                                                                   straight, capsys):
    """SIGTERM (what SLURM, Kubernetes and torchrun send before a kill) arrives in the middle of step 5, between
    the evaluations at 3 and 6: the step is finished, a checkpoint written at it, and the run stops with one line
    saying how to resume; resuming makes the uninterrupted run's steps. The previous handler is back afterwards."""
    forward, calls = ROT5.forward, []

    def forward_then_sigterm(self, *args, **kwargs):
        calls.extend([1] if self.training else [])
        if len(calls) == 9:  # the first micro-batch of step 5 (2 per step)
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    def unhandled(signum, frame):  # (the default action would end pytest itself)
        raise AssertionError("train.py left SIGTERM to its default action: the process dies, steps 4-5 are lost")

    before = signal.signal(signal.SIGTERM, unhandled)
    monkeypatch.setattr(ROT5, "forward", forward_then_sigterm)
    out = tmp_path / "preempted"
    try:
        with pytest.raises(SystemExit) as e:
            train.main(six_steps(sample_data) + [f"--out_dir={out}"])
        assert signal.getsignal(signal.SIGTERM) is unhandled
    finally:
        signal.signal(signal.SIGTERM, before)
    monkeypatch.setattr(ROT5, "forward", forward)
    message = str(e.value.code)
    assert message == (f"stopped by SIGTERM after step 5: saved {out / 'ckpt.pt'} at that step; continue with the "
                       "same command and --resume=True")
    assert len(calls) == 10 and checkpoint.load_checkpoint(str(out / "ckpt.pt"))["step"] == 5  # step 5 finished
    assert "SIGTERM: finishing this optimizer step" in capsys.readouterr().err
    train.main(six_steps(sample_data) + [f"--out_dir={out}", "--resume=True"])
    assert_same_run(straight, out)


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, sample_data, straight, capsys):
    """Bytes flipped in the final checkpoint (step 6; a bad sector): --resume=True falls back, with a line, to the
    previous one, which save_interval wrote at step 4, moves the damaged file aside, and redoes steps 5-6 into
    the uninterrupted run's weights."""
    from test_faults import flip_bytes

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    ckpt, prev = str(out / "ckpt.pt"), str(out / "ckpt.prev.pt")
    assert checkpoint.load_checkpoint(ckpt)["step"] == 6 and checkpoint.load_checkpoint(prev)["step"] == 4
    flip_bytes(ckpt)
    with pytest.raises(SystemExit, match="is damaged: its contents no longer match the sha256"):
        checkpoint.load_checkpoint(ckpt)
    capsys.readouterr()
    train.main(six_steps(sample_data) + [f"--out_dir={out}", "--resume=True"])
    said = capsys.readouterr()
    assert f"(moved it to {out / 'ckpt.damaged.pt'}); resuming from {prev}, step 4, instead" in said.out + said.err
    assert_same_run(straight, out)
    assert checkpoint.load_checkpoint(prev)["step"] == 4  # (the damaged file never became the previous one)


def test_torchelastic_restart_resumes_by_itself(tmp_path, sample_data, monkeypatch):
    out = tmp_path / "run"
    # a token budget: 1500 tokens / (4 documents x ~210 tokens per step) -> 2 steps (max_tokens wins over epochs)
    args = TINY + ["--max_tokens=1500", "--epochs=5", "--batch_size=4", "--micro_batch_size=4", "--eval_interval=1",
                   f"--out_dir={out}"]
    assert train.main(args)["max_steps"] == 2
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun --max-restarts sets after a failure
    train.main(args)
    assert events(out, "eval")[-1]["step"] == 2 and len(events(out, "train")) == 2  # nothing redone
    with pytest.raises(SystemExit, match=r"trained with other model keys \(d_ff\): resume with the config"):
        train.main(args + ["--d_ff=256"])


def test_non_finite_loss_skips_the_step(tmp_path, sample_data, monkeypatch, nan_losses):
    """A NaN loss at step 2: no update there, training goes on; max_bad_steps in a row stop the run, and no
    checkpoint ever holds non-finite weights."""
    saved = {}
    real_save = train.save_checkpoint

    def save_and_keep(path, obj):
        saved[obj["step"]] = ({k: v.clone() for k, v in obj["model"].items()},
                             float(obj["optimizer"]["state"][0]["step"]))  # AdamW's step count
        real_save(path, obj)

    monkeypatch.setattr(train, "save_checkpoint", save_and_keep)
    args = TINY + [steps_arg(sample_data, 4, 4), "--batch_size=4", "--micro_batch_size=2", "--eval_interval=1"]
    nan_losses.reset({3})  # micro-batch 1 of step 2 (2 per step): the step's loss is NaN
    train.main(args + [f"--out_dir={tmp_path / 'skip'}"])
    skips = events(tmp_path / "skip", "skip")
    assert [e["step"] for e in skips] == [2] and math.isnan(skips[0]["loss"])
    assert [e["step"] for e in events(tmp_path / "skip", "train")] == [1, 3, 4]
    assert_same_params(saved[2][0], saved[1][0], atol=0.0)   # step 2: no update...
    assert saved[2][1] == saved[1][1]                         # ...and no AdamW step
    assert saved[3][1] == saved[1][1] + 1
    assert all(torch.isfinite(v).all() for v in saved[4][0].values())

    nan_losses.reset(range(3, 100))  # every step from step 2 on
    saved.clear()
    with pytest.raises(SystemExit, match=r"3 non-finite steps in a row \(up to step 4\).*last good state \(step 3\)"):
        train.main(args + [f"--out_dir={tmp_path / 'stop'}", "--max_bad_steps=3"])
    assert sorted(saved) == [1, 2, 3]  # (eval_interval=1) nothing saved at the stop
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "stop" / "ckpt.pt"))
    assert ckpt["step"] == 3
    assert_same_params(ckpt["model"], saved[1][0], atol=0.0)  # the weights of the last real update


def test_throughput_excludes_evaluation_time(tmp_path, sample_data, monkeypatch):
    """tok/s (and MFU) measure training: an evaluation (and checkpoint) inside a log interval is left out.
    A fake clock makes this exact whatever the machine's load: every reading advances it by 1 s, and the
    evaluation after step 1 by 1000 s more."""
    clock, evaluations = {"t": 0.0}, []
    real_validation_loss = train.validation_loss

    def perf_counter() -> float:
        clock["t"] += 1.0
        return clock["t"]

    def slow_validation_loss(*args, **kwargs):
        evaluations.append(1)
        # an evaluation calls it twice (UL2 batches, then continuation batches): call 3 starts the evaluation
        # after step 1 (the first one is at step 0)
        if len(evaluations) == 3:
            clock["t"] += 1000.0
        return real_validation_loss(*args, **kwargs)

    monkeypatch.setattr(train.time, "perf_counter", perf_counter)
    monkeypatch.setattr(train, "validation_loss", slow_validation_loss)
    out = tmp_path / "clock"
    train.main(TINY + [steps_arg(sample_data, 2, 4), "--batch_size=4", "--micro_batch_size=4", "--log_interval=2",
                       "--eval_interval=1", f"--out_dir={out}"])
    (event,) = events(out, "train")  # steps 1-2, with the step-1 evaluation (1000 s) between them
    assert event["step"] == 2
    # counted, the evaluation alone would put tok/s below tokens / 1000 s; left out, a few clock readings remain
    assert event["tok_per_s"] > event["tokens"] / 10.0, event


def test_progress_bar_eta_excludes_evaluation_time(tmp_path, sample_data, monkeypatch):
    """The bar's rate and ETA come from the steps alone: an evaluation between steps is left out of both. One
    fake clock for train.py and tqdm makes this exact: every reading advances it by 1 ms, and the evaluation at
    step 2 by 1000 s more; without the fix the bar's elapsed time would hold the 1000 s and its rate fall to
    about 1 step per 500 s."""
    import tqdm.std
    clock, evaluations, bars = {"t": 0.0}, [], []
    real_validation_loss, real_step_bar = train.validation_loss, train.step_bar

    def now() -> float:
        clock["t"] += 0.001
        return clock["t"]

    def slow_validation_loss(*args, **kwargs):
        evaluations.append(1)
        if len(evaluations) == 3:  # two calls per evaluation (UL2, continuation): call 3 starts step 2's
            clock["t"] += 1000.0
        return real_validation_loss(*args, **kwargs)

    def recorded_step_bar(*args, **kwargs):
        bars.append(real_step_bar(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(train.time, "perf_counter", now)
    monkeypatch.setattr(tqdm.std, "time", now)  # the clock a tqdm bar reads, taken when it is made
    monkeypatch.setattr(train, "validation_loss", slow_validation_loss)
    monkeypatch.setattr(train, "step_bar", recorded_step_bar)
    train.main(TINY + [steps_arg(sample_data, 4, 4), "--batch_size=4", "--micro_batch_size=4", "--eval_interval=2",
                       "--eval_docs=4", f"--out_dir={tmp_path / 'eta'}"])
    state = bars[0].format_dict
    assert state["n"] == 4 and state["elapsed"] < 100, state
    assert state["rate"] is None or state["rate"] > 0.1, state


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, sample_data, straight, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = {name: (run / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl")}
    capsys.readouterr()
    result = train.main(six_steps(sample_data) + [f"--out_dir={run}", "--resume=True"])
    out = capsys.readouterr()
    line = f"{run / 'ckpt.pt'} already finished its 6 steps: nothing to do; to train further raise epochs or max_tokens"
    assert line in out.out and "resuming at step" not in out.out and "6/6 [" not in out.err + out.out
    assert result["step"] == 6 and result["max_steps"] == 6
    assert {name: (run / name).read_bytes() for name in before} == before


def test_extending_a_run_states_what_happens_to_the_learning_rate(tmp_path, sample_data, straight, capsys):
    """More epochs at resume: the schedule is recomputed for the new budget, and the warning gives the rate the
    run stopped at, the one it goes on with (logged at the next step), and the warm-up it goes through again."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    args = [a for a in six_steps(sample_data) if not a.startswith("--epochs=")]
    capsys.readouterr()
    train.main(args + [steps_arg(sample_data, 80, 4), f"--out_dir={run}", "--resume=True", "--eval_interval=100",
                       "--warmup_frac=0.1"])
    out = capsys.readouterr().out
    assert "warning: the budget changed from 6 to 80 steps: the learning-rate schedule (warm-up 8 steps, linear " \
           "decay) is recomputed for 80 steps, so at step 6 the rate goes from" in out
    stopped = events(straight, "train")[-1]["lr"]
    resumed = events(run, "train")[6]  # step 7: lr_factor(6, 80, 8) = 6 / 8
    assert resumed["step"] == 7 and resumed["lr"] == pytest.approx(3e-3 * 6 / 8)
    assert f"goes from {stopped:.2e} (where the run stopped) to {resumed['lr']:.2e} and warms up again to 3.00e-03 " \
           "by step 8, then decays linearly to 0 at step 80" in out


def test_validation_loss_per_mode(sample_data):
    """val_loss_R/X/S, from one forward per packed batch, are the losses of each mode's examples run apart, one
    example per row and one forward per mode: their token-weighted mean is val_loss."""
    tok = get_tokenizer(sample_data["tokenizer"])
    val = prepare.load_documents(os.path.join("data", "sample"), "val")
    torch.manual_seed(0)
    model = ROT5(ROT5Config(d_model=64, n_heads=2, head_dim=32, n_kv_heads=1, d_ff=128, n_encoder_layers=2,
                            n_decoder_layers=2, position="rope")).eval()
    packed = list(UL2Batches(val, tok, "ul2", 128, 64, 16, seed=train.EVAL_SEED, pack=True).eval_batches(64))
    plain = list(UL2Batches(val, tok, "ul2", 128, 64, 16, seed=train.EVAL_SEED).eval_batches(64))
    loss_sum, n_mode = dict.fromkeys("RXS", 0.0), dict.fromkeys("RXS", 0)
    with torch.no_grad():
        for b in plain:   # row r holds example r: take each mode's rows
            for m in n_mode:
                rows = b.input_ids[:, 0] == tok.mode_ids[m]
                if rows.any():
                    sub = Batch(*(t[rows] for t in b[:5]))
                    sub = sub._replace(label_index=label_positions(sub.labels))
                    n = int((sub.labels != -100).sum())
                    loss_sum[m], n_mode[m] = loss_sum[m] + float(model(sub).loss) * n, n_mode[m] + n
    got = train.validation_loss(model, packed, torch.device("cpu"), contextlib.nullcontext(), False, tok.mode_ids)
    model.eval()  # (validation_loss hands the model back in training mode)
    assert all(n_mode.values())  # 64 documents: every mode occurs
    # the same fp32 products summed in another order (other batch shapes): relative differences of a few fp32
    # ulps (1.2e-7) per logit, far below 1e-5 of the mean
    assert got["val_loss"] == pytest.approx(sum(loss_sum.values()) / sum(n_mode.values()), rel=1e-5)
    for m in n_mode:
        assert got[f"val_loss_{m}"] == pytest.approx(loss_sum[m] / n_mode[m], rel=1e-5)
    weighted = sum(n_mode[m] * got[f"val_loss_{m}"] for m in n_mode) / sum(n_mode.values())
    assert weighted == pytest.approx(got["val_loss"], rel=1e-12)  # (float64 sums of the same numbers)
    assert len({round(got[f"val_loss_{m}"], 6) for m in n_mode}) == 3  # three different numbers, not one copied
    # continuation batches are all [S] rows: R and X are absent, not zero
    cont = train.validation_loss(model, continuation_batches(val, tok, 16, 8), torch.device("cpu"),
                                 contextlib.nullcontext(), False, tok.mode_ids)
    assert cont["val_loss_R"] is None and cont["val_loss_X"] is None and cont["val_loss_S"] == cont["val_loss"]


def test_bfloat16_trains_on_cpu(tmp_path, sample_data, capsys):
    """dtype=bfloat16 runs the CPU path under bf16 autocast: it trains, and its losses differ from fp32's by
    bf16 rounding (8 significant bits: ~0.4% per rounding), not by more. On 40 + 8 real stories: CPUs without
    AMX emulate bf16, several times slower than fp32, and the run ends by evaluating its whole validation split."""
    stories = [s.strip() for s in open(prepare.SAMPLE_DIR + "/stories.txt", encoding="utf-8").read().split("<|endoftext|>")]
    valid = [s.strip() for s in open(prepare.SAMPLE_DIR + "/valid.txt", encoding="utf-8").read().split("<|endoftext|>")]
    for name, texts in (("train.txt", stories[:40]), ("val.txt", valid[:8])):
        (tmp_path / name).write_text("".join(f"{t}\n<|endoftext|>\n" for t in texts), encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()):
        prepare.prepare("tinystories", os.path.join("data", "bf16_test"), str(tmp_path / "train.txt"),
                        str(tmp_path / "val.txt"), workers=1)
    args = TINY + ["--dataset=bf16_test", "--epochs=0.2", "--batch_size=4", "--micro_batch_size=4", "--eval_docs=8",
                   "--eval_interval=100", "--learning_rate=3e-3"]
    train.main(args + [f"--out_dir={tmp_path / 'fp32'}"])
    capsys.readouterr()
    result = train.main(args + [f"--out_dir={tmp_path / 'bf16'}", "--dtype=bfloat16"])
    assert "cpu bf16" in capsys.readouterr().out
    fp32, bf16 = events(tmp_path / "fp32", "train"), events(tmp_path / "bf16", "train")
    assert [e["step"] for e in bf16] == [1, 2] and all(math.isfinite(e["loss"]) for e in bf16)
    for a, b in zip(fp32, bf16):
        assert a["loss"] != b["loss"] and b["loss"] == pytest.approx(a["loss"], rel=0.02)
    assert math.isfinite(result["full_continuation_loss"])
    weights = params(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in weights.values())  # autocast: the weights stay fp32
    assert any((weights[k] != v).any() for k, v in params(tmp_path / "fp32").items())


def test_dtype_auto_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert train.resolve_dtype("float32", cpu) == torch.float32 and train.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    for amx, want in ((True, torch.bfloat16), (False, torch.float32)):  # auto: bf16 on CPUs with AMX only
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda amx=amx: {"amx_bf16": amx, "avx2": True})
        assert train.resolve_dtype("auto", cpu) == want
    with pytest.raises(SystemExit, match=r"--dtype='fp16' is not a dtype: use float32, bfloat16, auto"):
        train.main(["--device=cpu", "--dtype=fp16"])


# ---------------------------------------------------------------------------------------------------------
# Optimizer, schedule, Chinchilla


def test_lr_schedule_is_hf_linear_with_warmup():
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_linear_schedule_with_warmup

    for total, warmup in [(100, 1), (1000, 10), (7, 0), (3870, 39)]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched: LambdaLR = get_linear_schedule_with_warmup(opt, warmup, total)
        hf = []
        for _ in range(total):
            hf.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert [train.lr_factor(s, total, warmup) for s in range(total)] == pytest.approx(hf, abs=1e-12)


def test_weight_decay_on_matrices_only():
    model = ROT5(ROT5Config(d_model=64, n_heads=2, head_dim=32, n_kv_heads=2, d_ff=128, n_encoder_layers=2,
                            n_decoder_layers=2, position="t5", n_experts=2))
    decay, no_decay = train.param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert "embed.weight" in decayed and "encoder.layers.0.attn.qkv.weight" in decayed
    assert "encoder.layers.1.ffn.router.weight" in decayed
    assert {"encoder.relative_bias.bias.weight", "decoder.relative_bias.bias.weight"} <= kept
    assert all(n.endswith("norm.weight") or "relative_bias" in n for n in kept)


def test_chinchilla_numbers_of_the_seed(capsys):
    c, n_opt, d_opt = train.chinchilla(1.37e9)  # 2 epochs of TinyStories-Instruct (2 x 684,805,492 tokens)
    assert c == pytest.approx(3.65e17, rel=0.01)
    assert n_opt == pytest.approx(48e6, rel=0.01)
    assert d_opt == pytest.approx(1.37e9, rel=1e-9)  # D_opt(C(D)) = D
    train.main(["--chinchilla=1.37e9"])
    assert "N_opt = 48.0M" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Configuration errors: one clear line


def test_unknown_key_lists_valid_keys(tmp_path):
    cfg = tmp_path / "typo.py"
    cfg.write_text("batch_size = 64\nlerning_rate = 1e-3\n")
    for argv in ([str(cfg)], ["--lerning_rate=1e-3"]):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        msg = str(e.value)
        assert "unknown config key 'lerning_rate'" in msg and "did you mean 'learning_rate'" in msg
        assert "valid keys:" in msg and "micro_batch_size" in msg and "d_model" in msg and "\n" not in msg


def test_values_must_have_the_default_type(tmp_path):
    with pytest.raises(SystemExit, match="batch_size must be int .* got 0.5"):
        train.main(["--batch_size=0.5"])
    with pytest.raises(SystemExit, match="compile must be bool"):
        train.main(["--compile=1"])
    with pytest.raises(SystemExit, match="write overrides as --key=value"):
        train.main(["--compile"])
    from configurator import configure
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\n_helper = 3\nepochs = 2\nout_dir = 'out/x'\n")
    got = configure(train.TRAIN_DEFAULTS, [str(cfg), "--learning_rate=1", "--dataset=123", "--out_dir=out/y"])
    assert got["epochs"] == 2.0 and type(got["epochs"]) is float  # an int is fine for a float key
    assert got["learning_rate"] == 1.0 and type(got["learning_rate"]) is float
    assert got["dataset"] == "123" and got["out_dir"] == "out/y"    # later arguments win


def test_config_files_first_then_overrides_and_broken_files(tmp_path):
    from configurator import configure
    cfg = tmp_path / "c.py"
    cfg.write_text("from math import ceil\nbatch_size = ceil(15.5)\n")  # imported helpers are not keys
    assert configure(train.TRAIN_DEFAULTS, ["--batch_size=64", str(cfg)])["batch_size"] == 64  # overrides win
    assert configure(train.TRAIN_DEFAULTS, [str(cfg)])["batch_size"] == 16
    broken = tmp_path / "broken.py"
    broken.write_text("batch_size = 64\nepochs = (1\n")
    with pytest.raises(SystemExit, match=r"config file .*broken\.py:2 does not run \(SyntaxError"):
        train.main([str(broken)])


@pytest.mark.parametrize("arg, message", [
    ("--log_interval=0", "--log_interval=0 must be > 0"), ("--grad_clip=-1.0", "--grad_clip=-1.0 must be >= 0"),
    ("--warmup_frac=1.5", r"--warmup_frac=1.5 must be in \[0, 1\)"), ("--seed=-1", r"--seed=-1 must be in \[0, 2\*\*31\)"),
    ("--device=gpu", "device 'gpu' is not a device name: use auto, cpu, cuda or cuda:N"),
    ("--chinchilla=-1", "a data budget > 0")])
def test_out_of_range_values_are_one_line(arg, message):
    with pytest.raises(SystemExit, match=message):
        train.main([arg])


@pytest.mark.parametrize("name, message", [
    ("gpu0", "'gpu0' is not a device name"), ("", "'' is not a device name"),
    ("xpu", "'xpu': ROT5 runs on cpu or cuda"), ("meta", "'meta': ROT5 runs on cpu or cuda"),
    ("cuda:99", f"'cuda:99' is cuda:99, but this PyTorch sees {torch.cuda.device_count()} CUDA GPU(s)")])
def test_resolve_device_errors_name_the_device(name, message):
    """train.py, finetune.py and sample.py share one check: a wrong device is one line, before any work."""
    with pytest.raises(SystemExit) as e:
        train.resolve_device(name)
    assert message in str(e.value.code) and "\n" not in str(e.value.code)


def test_resolve_device_auto_and_local_rank():
    assert train.resolve_device("cpu") == torch.device("cpu")
    assert train.resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if torch.cuda.device_count() >= 2:
        assert train.resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    else:  # no second GPU: "cuda" for LOCAL_RANK 1 must not silently share GPU 0
        with pytest.raises(SystemExit, match="'cuda' is cuda:1, but this PyTorch sees"):
            train.resolve_device("cuda", local_rank=1)


def test_resume_without_a_checkpoint_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"--resume=True but .*nothing/ckpt.pt does not exist: nothing to resume"):
        train.main(TINY + [f"--out_dir={tmp_path / 'nothing'}", "--resume=True"])


def test_a_new_run_never_overwrites_a_checkpoint(tmp_path, sample_data):
    out = tmp_path / "run"
    argv = TINY + [steps_arg(sample_data, 1, 4), "--batch_size=4", "--micro_batch_size=4", f"--out_dir={out}"]
    train.main(argv)
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="ckpt.pt exists: continue that run with --resume=True"):
        train.main(argv + ["--learning_rate=1e-3"])
    assert (out / "ckpt.pt").read_bytes() == before


def test_missing_config_file_and_bad_batch_split():
    with pytest.raises(SystemExit, match=r"config file config/nope\.py does not exist"):
        train.main(["config/nope.py"])
    with pytest.raises(SystemExit, match=r"batch_size=10 must be a multiple of micro_batch_size x processes = 4 x 1"):
        train.main(["--batch_size=10", "--micro_batch_size=4"])


def test_vocab_must_match_the_data(tmp_path):
    with pytest.raises(SystemExit, match="tokenized with 'mistral' but the model has vocab_size=50304: set --vocab_size=32256"):
        train.main(TINY + ["--vocab_size=50304", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="n_kv_heads=3 must divide n_heads=2"):  # ROT5Config's check, one line
        train.main(TINY + ["--n_kv_heads=3"])


def test_every_config_preset_parses():
    from configurator import configure
    from dataclasses import asdict
    defaults = {**train.TRAIN_DEFAULTS, **asdict(ROT5Config())}
    for name in sorted(os.listdir(os.path.join(REPO, "config"))):
        if name.startswith("finetune"):  # finetune.py's
            continue
        cfg = configure(defaults, [os.path.join(REPO, "config", name)])
        ROT5Config(**{k: cfg[k] for k in asdict(ROT5Config())})  # valid model config
        assert cfg["batch_size"] % cfg["micro_batch_size"] == 0, name


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def tiny_checkpoint(step: int) -> dict:
    cfg = ROT5Config(d_model=64, n_heads=2, head_dim=32, n_kv_heads=1, d_ff=128, n_encoder_layers=1,
                     n_decoder_layers=1, position="rope")
    from dataclasses import asdict
    return {"kind": "pretrain", "model": ROT5(cfg).state_dict(), "model_config": asdict(cfg), "tokenizer": "mistral",
            "config": {}, "step": step, "optimizer": {}, "rng": checkpoint.random_states(), "metrics": {}}


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    """A save replaces ckpt.pt whole and keeps the checkpoint it replaces as ckpt.prev.pt; a save that fails at
    any point leaves both as they were."""
    path, prev = str(tmp_path / "ckpt.pt"), str(tmp_path / "ckpt.prev.pt")
    checkpoint.save_checkpoint(path, tiny_checkpoint(1))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    checkpoint.save_checkpoint(path, tiny_checkpoint(2))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.prev.pt", "ckpt.pt"]
    assert checkpoint.load_checkpoint(path)["step"] == 2 and checkpoint.load_checkpoint(prev)["step"] == 1

    real_save = torch.save

    def dies_halfway(obj, f, *a, **k):  # e.g. the disk fills up, or the job is killed mid-write
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(path, tiny_checkpoint(3))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.prev.pt", "ckpt.pt"]
    assert checkpoint.load_checkpoint(path)["step"] == 2 and checkpoint.load_checkpoint(prev)["step"] == 1


def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at .*missing.pt"):
        checkpoint.load_checkpoint(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match="is not a readable checkpoint"):
        checkpoint.load_checkpoint(str(junk))
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"shared.weight": torch.zeros(2, 2)}, foreign)  # a bare state_dict, e.g. HF's pytorch_model.bin
    with pytest.raises(SystemExit, match="is not a ROT5 checkpoint: it lacks kind, model, model_config"):
        checkpoint.load_checkpoint(foreign)

    good = tiny_checkpoint(5)
    path = str(tmp_path / "ok.pt")
    checkpoint.save_checkpoint(path, good)
    model, tok, ckpt = checkpoint.load_model(path)
    assert not model.training and tok.vocab_size == model.cfg.vocab_size and ckpt["step"] == 5
    assert_same_params(model.state_dict(), good["model"], atol=0.0)

    newer = dict(good, model_config={**good["model_config"], "attention_sinks": 4})
    checkpoint.save_checkpoint(path, newer)
    with pytest.raises(SystemExit, match=r"model_config fields \['attention_sinks'\] that this model.py does not know"):
        checkpoint.load_model(path)
    wrong = dict(good, model_config={**good["model_config"], "d_ff": 256})
    checkpoint.save_checkpoint(path, wrong)
    with pytest.raises(SystemExit, match="the weights do not fit its model_config"):
        checkpoint.load_model(path)


def test_a_checkpoint_older_than_a_model_field_loads_as_the_model_it_was(tmp_path):
    """A model_config saved before attention, scale_output, moe_step and cross_rope existed reads as the model
    that wrote it (their defaults), so it loads and a run resumes from it without "other model keys"."""
    good = tiny_checkpoint(5)
    old = {k: v for k, v in good["model_config"].items() if k not in ("attention", "scale_output", "moe_step", "cross_rope")}
    assert checkpoint.model_config({"model_config": old}) == good["model_config"]
    path = str(tmp_path / "old.pt")
    checkpoint.save_checkpoint(path, dict(good, model_config=old))
    model, _, _ = checkpoint.load_model(path)
    assert_same_params(model.state_dict(), good["model"], atol=0.0)
