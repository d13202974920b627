"""Faults, by class: a full disk (a fake one: writes past a byte budget raise ENOSPC), a run killed mid-append
(a torn metrics line), damaged shards and meta.json, temp files a killed run left, bad settings. Each must end
in one line that names the problem and the fix, never lose a checkpoint, and never train on damaged data.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_faults.py"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import ablation  # noqa: E402
import checkpoint  # noqa: E402
import diskio  # noqa: E402
import finetune  # noqa: E402
import generate  # noqa: E402
import prepare  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from model import ROT5, ROT5Config  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

TINY = ["--dataset=sample", "--device=cpu", "--d_model=64", "--n_heads=2", "--head_dim=32", "--n_kv_heads=1",
        "--d_ff=128", "--n_encoder_layers=2", "--n_decoder_layers=2", "--position=rope", "--encoder_len=128",
        "--decoder_len=64", "--eval_docs=8", "--eval_batch_size=8", "--log_interval=1"]


@pytest.fixture(scope="module")
def sample_dir() -> str:
    """data/sample/ of this checkout, prepared (a no-op when it is up to date). Tests damage copies of it."""
    d = os.path.join(REPO, "data", "sample")
    prepare.prepare("sample", d, workers=1)
    return d


@pytest.fixture
def data_copy(sample_dir, tmp_path) -> str:
    d = str(tmp_path / "sample")
    shutil.copytree(sample_dir, d)
    return d


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value.code if isinstance(e.value, SystemExit) else e.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------------
# A full disk


class FullDisk:
    """Writes through diskio (atomic_write's file objects, append_line's os.write) succeed until `budget` bytes
    are written, then fail with ENOSPC, after writing what still fit, as a real full disk does."""

    def __init__(self, monkeypatch):
        self.budget: float = float("inf")
        real_fdopen, real_write = os.fdopen, os.write
        disk = self

        class File:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                n = len(data.encode()) if isinstance(data, str) else len(memoryview(data).cast("B"))
                if n > disk.budget:
                    self.f.write(data[:int(disk.budget)] if isinstance(data, str) else
                                 memoryview(data).cast("B")[:int(disk.budget)])
                    disk.budget = 0
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.budget -= n
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def write(fd, data):
            n = len(memoryview(data).cast("B"))
            if n > disk.budget:
                real_write(fd, memoryview(data).cast("B")[:int(disk.budget)])
                disk.budget = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            disk.budget -= n
            return real_write(fd, data)

        monkeypatch.setattr(diskio.os, "fdopen", lambda *a, **k: File(real_fdopen(*a, **k)))
        monkeypatch.setattr(diskio.os, "write", write)

    def fill(self, after: int = 0) -> None:
        self.budget = after

    def free(self) -> None:
        self.budget = float("inf")


@pytest.fixture
def disk(monkeypatch) -> FullDisk:
    return FullDisk(monkeypatch)


TINY_CFG = ROT5Config(d_model=64, n_heads=2, head_dim=32, n_kv_heads=1, d_ff=128, n_encoder_layers=1,
                      n_decoder_layers=1, position="rope")


def tiny_checkpoint(step: int) -> dict:
    cfg = TINY_CFG
    return {"kind": "pretrain", "model": ROT5(cfg).state_dict(), "model_config": asdict(cfg), "tokenizer": "mistral",
            "config": {"encoder_len": 128}, "step": step, "optimizer": {}, "rng": checkpoint.random_states(),
            "metrics": {}}


def test_full_disk_during_a_checkpoint_save_keeps_the_old_one(tmp_path, disk):
    """torch.save reports the full disk as a RuntimeError ("unexpected pos") around the OSError: one line."""
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, tiny_checkpoint(2))
    disk.fill(after=10_000)
    with pytest.raises(diskio.WriteFailed) as e:
        checkpoint.save_checkpoint(path, tiny_checkpoint(3))
    message = one_line(e)
    assert f"could not write {path}: No space left on device" in message
    weights = sum(t.numel() * t.element_size() for t in tiny_checkpoint(0)["model"].values())
    needed = weights + torch.get_rng_state().numel()  # + the RNG state (the optimizer's is empty here)
    assert f"{diskio.human(needed)} needed" in message
    assert f"the last checkpoint, {path}, is intact" in message and "--resume=True" in message
    disk.free()
    assert os.listdir(tmp_path) == ["ckpt.pt"] and checkpoint.load_checkpoint(path)["step"] == 2


def test_full_disk_mid_run_then_a_torn_line_and_stale_temps_then_resume(tmp_path, disk, sample_dir, capsys,
                                                                        monkeypatch):
    """The disk fills after the step-2 checkpoint: the next metrics append fails with one line and leaves no
    part of its line; a kill mid-append (a torn line) and kills mid-save (temp files) come on top; --resume=True
    then finishes the run with every step logged once, and removes the temp files."""
    monkeypatch.chdir(REPO)  # train.py reads data/<dataset> relative to the working directory
    out = tmp_path / "run"
    args = TINY + ["--max_tokens=3000", "--batch_size=4", "--micro_batch_size=4", "--eval_interval=2",
                   f"--out_dir={out}"]
    real_save = train.save_checkpoint

    def save_then_fill(path, obj):
        real_save(path, obj)
        if obj["step"] == 2:
            disk.fill(after=10)

    monkeypatch.setattr(train, "save_checkpoint", save_then_fill)
    with pytest.raises(diskio.WriteFailed) as e:
        train.main(args)
    message = one_line(e)
    metrics = out / "metrics.jsonl"
    assert f"could not write {metrics}: No space left on device" in message
    assert f"the last checkpoint, {out / 'ckpt.pt'}, is intact" in message and "--resume=True" in message
    text = metrics.read_text()
    assert text.endswith("\n") and [json.loads(line)["step"] for line in text.splitlines()][-1] == 2

    disk.free()
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    with open(metrics, "a") as f:
        f.write('{"event": "train", "step": 3, "tok')  # killed mid-append
    (out / ".ckpt.pt.k1ll3d00.tmp").write_bytes(b"\0" * 1000)  # killed mid-save (and the pre-diskio name)
    (out / "ckpt.pt.tmp4242").write_bytes(b"\0" * 1000)
    (out / "notes.tmp").write_text("not ours")
    capsys.readouterr()
    steps = train.main(args + ["--resume=True"])["max_steps"]
    log = capsys.readouterr()
    assert "dropped the last line" in log.out + log.err
    assert sorted(os.listdir(out)) == ["ckpt.prev.pt", "ckpt.pt", "metrics.jsonl", "notes.tmp", "run.lock"]
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, steps + 1))


def test_full_disk_while_preparing_leaves_no_temp_file_and_says_how_to_rerun(tmp_path, disk):
    out = str(tmp_path / "data")
    disk.fill(after=600_000)  # val.bin (~390 kB, 966 stories) fits, train.bin (~3 MB) does not
    with pytest.raises(diskio.WriteFailed) as e:
        prepare.prepare("sample", out, workers=1)
    message = one_line(e)
    assert f"could not write {os.path.join(out, 'train.bin')}: No space left on device" in message
    assert "no meta.json" in message and f"python prepare.py DATASET --out-dir {out}` again" in message
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")] and "meta.json" not in os.listdir(out)
    disk.free()
    prepare.prepare("sample", out, workers=1)
    assert len(prepare.load_documents(out, "train")) == 7204


def test_full_disk_for_predictions_and_the_ablation_state(tmp_path, disk):
    disk.fill()
    with pytest.raises(diskio.WriteFailed) as e:
        finetune.write_predictions(str(tmp_path / "predictions.jsonl"), [{"prediction": "Lily was happy."}])
    assert "no checkpoint was written yet" in one_line(e)
    with pytest.raises(diskio.WriteFailed) as e:
        ablation.write_json(str(tmp_path / "ablation.json"), {"result": None})
    assert "run the same ablation.py command again" in one_line(e)
    assert os.listdir(tmp_path) == []


def test_other_write_errors_are_not_called_a_full_disk(tmp_path):
    """Only lack of space becomes WriteFailed; any other error passes through unchanged (and leaves no temp)."""
    with pytest.raises(ValueError, match="not a disk problem"):
        with diskio.atomic_write(str(tmp_path / "x.json"), "w") as f:
            f.write("{")
            raise ValueError("not a disk problem")
    assert os.listdir(tmp_path) == []


def flip_bytes(path: str, n: int = 24) -> None:
    """Flip n bytes inside the largest tensor a torch.save zip holds (its records are stored, not compressed),
    as a bad sector or a damaged copy would: the archive still opens."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
        start = info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2
        f.seek(start)
        data = f.read(n)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def test_a_flipped_byte_in_a_checkpoint_is_one_line(tmp_path):
    """24 bytes flipped inside the weights: torch.load reads the file without complaint (it checks no CRC), and
    the model it gives is dead; the checksum recorded at save time refuses it, with one line that points to the
    previous checkpoint (kept by the save that replaced it)."""
    path, prev = str(tmp_path / "ckpt.pt"), str(tmp_path / "ckpt.prev.pt")
    checkpoint.save_checkpoint(path, tiny_checkpoint(1))
    checkpoint.save_checkpoint(path, tiny_checkpoint(2))
    flip_bytes(path)
    torch.load(path, weights_only=True)  # (loads silently)
    for load in (checkpoint.load_checkpoint, checkpoint.load_model):
        with pytest.raises(SystemExit) as e:
            load(path)
        message = one_line(e)
        assert f"{path} is damaged: its contents no longer match the sha256 recorded when it was saved" in message
        assert f"use the previous checkpoint, {prev}" in message
    assert checkpoint.load_checkpoint(prev)["step"] == 1


def test_an_unreadable_checkpoint_never_suggests_loading_it_unsafely(tmp_path):
    """torch.load's own message for a refused pickle advises weights_only=False, which for a file from elsewhere
    runs its code: the line says what the file is instead."""
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo ran",))

    foreign, text = str(tmp_path / "foreign.pt"), str(tmp_path / "text.pt")
    torch.save({"model": Payload()}, foreign)
    open(text, "w").write("x")
    for path, message in ((foreign, "it holds Python objects other than tensors and plain values"),
                          (text, "its contents are not a pickle PyTorch reads")):
        with pytest.raises(SystemExit) as e:
            checkpoint.load_checkpoint(path)
        assert message in one_line(e) and "weights_only" not in one_line(e) and "restore it from a copy" in one_line(e)
    with pytest.raises(SystemExit) as e:
        checkpoint.load_checkpoint(str(tmp_path))
    assert "is a directory, not a checkpoint file" in one_line(e)


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
import checkpoint
lock = checkpoint.RunLock()  # (held while the object lives)
lock.claim({out!r})
print("holding", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_locked_out_dir_is_refused_and_kill_9_frees_it(tmp_path, monkeypatch):
    """A run holding out_dir's lock (another process): train.py and finetune.py refuse the directory at once,
    before reading data or a model, with one line naming the holder; kill -9 of the holder frees it (the
    kernel drops a flock with its process), so no stale lock blocks the next run."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(repo=REPO, out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"

        def no_work(*args):
            raise AssertionError("data or a model was read before the lock was checked")

        monkeypatch.setattr(prepare, "load_meta", no_work)
        monkeypatch.setattr(finetune, "load_model", no_work)
        for main in (train.main, finetune.main):
            with pytest.raises(SystemExit) as e:
                main(TINY[:2] + [f"--out_dir={out}", "--resume=True"])
            message = one_line(e)
            assert f"{out} is in use by another run (pid {holder.pid} on " in message and "use another --out_dir" in message
    finally:
        holder.kill()  # SIGKILL
        holder.wait()
    lock = checkpoint.RunLock()
    lock.claim(str(out))
    assert lock.file is not None and f"pid {os.getpid()} on " in open(out / "run.lock").read()
    lock.release()


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="forks children")
def test_a_child_forked_inside_a_run_dies_of_sigterm_even_at_once():
    """A process forked inside preempt.handled() (a fork-started worker pool) has no run to save: it gets the
    handlers from before the run back, so SIGTERM ends it, even when sent before the child ran any code. That is
    what multiprocessing.Pool.terminate() does to a worker it has just started, and CPython's child used to lose
    such a signal (its handler had caught it), leaving the worker waiting forever for the queue lock terminate()
    holds: measured before the fix, 50 of 50 children kept running. The parent's run does not count the signal."""
    import preempt

    with preempt.handled() as stop:
        for _ in range(5):
            pid = os.fork()
            if pid == 0:  # the child: only the signal ends it before this exit
                time.sleep(10)
                os._exit(3)
            os.kill(pid, signal.SIGTERM)  # at once: the child has most likely not run yet
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
        pid = os.fork()
        if pid == 0:  # the handlers from before the run: SIGTERM's default, Ctrl-C's KeyboardInterrupt
            restored = (signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
                        and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
            os._exit(0 if restored else 4)
        assert os.waitpid(pid, 0)[1] == 0
        assert not stop.requested() and signal.getsignal(signal.SIGTERM) == stop.handle


def test_ablation_says_to_run_the_same_command_again_when_stopped(monkeypatch):
    """A signal that stops a run inside ablation.py: the line keeps what was saved and says how the study goes
    on (the same ablation.py command), not the inner script's --resume=True."""
    import preempt

    def stopped(argv):
        raise preempt.Stopped("stopped by SIGTERM after step 3: saved out/x/ckpt.pt at that step",
                              "continue with the same command and --resume=True")

    monkeypatch.setattr(ablation, "study", stopped)
    with pytest.raises(SystemExit) as e:
        ablation.main([])
    message = one_line(e)
    assert message.startswith("stopped by SIGTERM after step 3: saved out/x/ckpt.pt at that step; run the same "
                              "ablation.py command again") and "--resume" not in message


EXPORT_ON_A_FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {repo!r})
# past the file-size limit the kernel fails a write with EFBIG, as a full disk fails it with ENOSPC
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
import checkpoint
for out, extra in ((sys.argv[2], []), (sys.argv[3], ["--hf"])):
    try:
        checkpoint.main(["export", "--ckpt", sys.argv[1], "--out", out, *extra])
    except SystemExit as e:
        print(e.code, flush=True)
"""


def test_export_onto_a_full_disk_a_read_only_file_system_or_a_mount_point_is_one_line(tmp_path, monkeypatch):
    """ENOSPC / SafetensorError (--hf) / EROFS / EBUSY tracebacks before; one line each now, and nothing of the
    export left behind."""
    cfg = ROT5Config(d_model=64, n_heads=2, head_dim=32, n_kv_heads=2, d_ff=128, n_encoder_layers=1,
                     n_decoder_layers=1, position="t5")  # the T5 baseline: --hf exports it too
    ckpt = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(ckpt, {**tiny_checkpoint(1), "model": ROT5(cfg).state_dict(), "model_config": asdict(cfg)})
    exports = tmp_path / "exports"
    exports.mkdir()
    script = tmp_path / "export.py"
    script.write_text(EXPORT_ON_A_FULL_DISK.format(repo=REPO))
    proc = subprocess.run([sys.executable, str(script), ckpt, str(exports / "st"), str(exports / "hf")],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout + proc.stderr[-2000:]
    for line, out in zip(lines, ("st", "hf")):
        assert f"could not write {exports / out}: File too large" in line and "nothing was left of it" in line, line
    assert os.listdir(exports) == []

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(checkpoint.tempfile, "mkdtemp", read_only)
    with pytest.raises(SystemExit) as e:
        checkpoint.main(["export", "--ckpt", ckpt, "--out", str(exports / "ro")])
    assert f"could not write {exports / 'ro'}: Read-only file system" in one_line(e)
    monkeypatch.setattr(checkpoint.os.path, "ismount", lambda path: path == str(exports))
    with pytest.raises(SystemExit) as e:
        checkpoint.main(["export", "--ckpt", ckpt, "--out", str(exports)])
    assert f"--out={exports} is a mount point" in one_line(e) and f"--out={exports / 'export'}" in one_line(e)
    assert os.listdir(exports) == []


def test_an_hf_model_whose_weights_do_not_load_is_one_line(hf_t5_dirs, tmp_path):
    """A save_pretrained directory whose model.safetensors is cut or not one: a SafetensorError traceback before."""
    d = tmp_path / "hf"
    shutil.copytree(hf_t5_dirs["relu"], d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit) as e:
        checkpoint.load_model(str(d))
    assert f"{d}: its weights cannot be loaded (SafetensorError" in one_line(e) and "again" in one_line(e)


# ---------------------------------------------------------------------------------------------------------
# The metrics log


def test_restart_log_drops_a_torn_last_line_and_refuses_a_garbled_one(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    lines = [json.dumps({"event": "train", "step": s}) + "\n" for s in range(1, 5)]
    torn = '{"event": "eval", "st'
    with open(path, "w") as f:
        f.writelines(lines + [torn])
    notes: list[str] = []
    checkpoint.restart_log(path, 3, notes.append)
    assert open(path).read() == "".join(lines[:3])  # up to the checkpoint's step, torn line gone
    assert len(notes) == 1 and "dropped the last line" in notes[0] and f"{len(torn)} bytes" in notes[0]

    checkpoint.restart_log(path, 3, notes.append)  # nothing torn: no note
    assert len(notes) == 1 and open(path).read() == "".join(lines[:3])

    with open(path, "w") as f:
        f.writelines([lines[0], "garbage\n", lines[2]])
    with pytest.raises(SystemExit) as e:
        checkpoint.restart_log(path, 3, notes.append)
    assert f"{path} line 2 is not a metrics event" in one_line(e)
    checkpoint.restart_log(path, None)  # a new run starts an empty log, whatever was there
    assert open(path).read() == ""


def test_a_failed_append_leaves_the_log_as_it_was(tmp_path, disk):
    path = str(tmp_path / "metrics.jsonl")
    checkpoint.log_event(path, {"event": "train", "step": 1})
    before = open(path, "rb").read()
    disk.fill(after=7)  # part of the next line fits
    with pytest.raises(diskio.WriteFailed):
        checkpoint.log_event(path, {"event": "train", "step": 2})
    assert open(path, "rb").read() == before


# ---------------------------------------------------------------------------------------------------------
# Damaged data


def test_an_out_of_range_id_is_found_before_training(data_copy, sample_dir):
    docs = prepare.load_documents(data_copy, "train")
    pos = int(docs.offsets[100]) + 3  # inside document 100
    shard = np.memmap(os.path.join(data_copy, "train.bin"), dtype=np.uint16, mode="r+")
    shard[pos] = 40000  # >= pad_id 32000: no text id
    shard.flush()
    with pytest.raises(ValueError) as e:
        prepare.load_documents(data_copy, "train")
    assert f"holds id 40000 at token {pos:,} (document 100)" in one_line(e) and "python prepare.py" in one_line(e)


def test_an_in_range_flip_is_caught_by_the_checksum_and_prepare_rebuilds(data_copy, capsys):
    path = os.path.join(data_copy, "train.bin")
    original = open(path, "rb").read()
    pos = int(prepare.load_documents(data_copy, "train").offsets[50]) + 2  # inside document 50
    shard = np.memmap(path, dtype=np.uint16, mode="r+")
    shard[pos] = 1000 if shard[pos] != 1000 else 1001  # another word: still a text id
    shard.flush()
    with pytest.raises(ValueError) as e:
        prepare.load_documents(data_copy, "train")
    assert f"{path} has changed since prepare.py wrote it" in one_line(e)
    capsys.readouterr()
    prepare.prepare("sample", data_copy, workers=1)
    out = capsys.readouterr().out
    assert "rebuilding" in out and "has changed since prepare.py wrote it" in out and "up to date" not in out
    assert open(path, "rb").read() == original


def test_cut_emptied_or_replaced_files_are_one_line(data_copy):
    bin_path, idx_path = os.path.join(data_copy, "val.bin"), os.path.join(data_copy, "val.idx.npy")
    good_bin, good_idx = open(bin_path, "rb").read(), open(idx_path, "rb").read()
    for data, message in [(good_bin[:-1], "bytes, not a whole number of uint16 tokens"),
                          (b"", "is 0 bytes, not a whole number of uint16 tokens"),
                          (good_bin[:-2], "does not match its index")]:
        open(bin_path, "wb").write(data)
        with pytest.raises(ValueError) as e:
            prepare.load_documents(data_copy, "val")
        assert message in one_line(e) and bin_path in one_line(e) and "python prepare.py" in one_line(e)
    open(bin_path, "wb").write(good_bin)
    offsets = np.load(idx_path)
    for data, message in [(b"not an index", "is not a readable index"), (good_idx[:-5], "is not a readable index")]:
        open(idx_path, "wb").write(data)
        with pytest.raises(ValueError) as e:
            prepare.load_documents(data_copy, "val")
        assert message in one_line(e) and idx_path in one_line(e)
    shifted = offsets.copy()
    shifted[5] += 1  # still increasing and ending where the shard ends, but document 4 no longer ends in eos
    np.save(idx_path, shifted)
    with pytest.raises(ValueError) as e:
        prepare.load_documents(data_copy, "val")
    assert "document 4 of" in one_line(e) and "does not end in eos" in one_line(e)


@pytest.mark.parametrize("key, value", [("tokenizer_sha256", "0" * 64), ("eos_id", 3), ("vocab_size", 32384),
                                        ("pad_id", 32001)])
def test_meta_json_must_match_the_tokenizer_that_will_be_used(data_copy, key, value, monkeypatch):
    meta_path = os.path.join(data_copy, "meta.json")
    meta = json.load(open(meta_path))
    json.dump({**meta, key: value}, open(meta_path, "w"))
    with pytest.raises(ValueError) as e:
        prepare.load_tokenizer(data_copy)
    assert f"meta.json does not match the 'mistral' tokenizer here ({key} {value!r} in meta.json" in one_line(e)
    # and train.py stops on it before it builds anything
    os.makedirs(tmp := os.path.join(os.path.dirname(data_copy), "work", "data"))
    shutil.move(data_copy, os.path.join(tmp, "sample"))
    monkeypatch.chdir(os.path.dirname(tmp))
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--out_dir=run"])
    assert key in one_line(e) and not os.path.exists("run")


def test_a_tokenizer_that_cannot_load_is_one_line(data_copy, monkeypatch):
    meta_path = os.path.join(data_copy, "meta.json")
    meta = json.load(open(meta_path))
    json.dump({**meta, "tokenizer": "llama"}, open(meta_path, "w"))
    with pytest.raises(ValueError) as e:
        prepare.load_tokenizer(data_copy)
    assert "unknown tokenizer 'llama'" in one_line(e) and "its meta.json names 'llama'" in one_line(e)

    def offline(name):  # tiktoken offline, without its cached BPE file
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    json.dump({**meta, "tokenizer": "gpt2"}, open(meta_path, "w"))
    monkeypatch.setattr(prepare, "get_tokenizer", offline)
    with pytest.raises(ValueError) as e:
        prepare.load_tokenizer(data_copy)
    assert "the gpt2 tokenizer could not load its vocabulary (ConnectionError)" in one_line(e)


@pytest.mark.parametrize("edit, message", [
    (lambda m: {k: v for k, v in m.items() if k != "splits"}, "meta.json: splits must be a JSON object (it is missing)"),
    (lambda m: {k: v for k, v in m.items() if k != "tokenizer"}, "meta.json: tokenizer must be a JSON string (it is missing)"),
    (lambda m: [], "meta.json holds a JSON array, not the object prepare.py writes"),
    (lambda m: {**m, "splits": {**m["splits"], "train": {"tokens": 5}}}, "splits.train.documents must be a JSON integer"),
])
def test_an_edited_meta_json_is_one_line_naming_the_key(data_copy, monkeypatch, edit, message):
    """meta.json without "splits" or "tokenizer", replaced by [], or with a split cut short: KeyError and
    AttributeError tracebacks before; one line naming the key, before any directory is made."""
    meta_path = os.path.join(data_copy, "meta.json")
    json.dump(edit(json.load(open(meta_path))), open(meta_path, "w"))
    with pytest.raises(ValueError) as e:
        prepare.load_meta(data_copy)
    assert message in one_line(e) and "run `python prepare.py sample` again" in one_line(e)
    os.makedirs(work := os.path.join(os.path.dirname(data_copy), "work", "data"))
    shutil.move(data_copy, os.path.join(work, "sample"))
    monkeypatch.chdir(os.path.dirname(work))
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--out_dir=run"])
    assert message in one_line(e) and not os.path.exists("run")


# ---------------------------------------------------------------------------------------------------------
# Temp files a killed process left


def test_prepare_removes_the_temp_files_of_a_killed_run(data_copy, capsys):
    stale = os.path.join(data_copy, ".train.bin.k1ll3d00.tmp")
    open(stale, "wb").write(b"\0" * 4096)
    other = os.path.join(data_copy, ".notes.txt.abcdefgh.tmp")  # not a file prepare.py writes: kept
    open(other, "w").write("x")
    prepare.prepare("sample", data_copy, workers=1)
    out = capsys.readouterr().out
    assert "removed 1 temp file(s) (4.1 kB)" in out and "up to date" in out
    assert not os.path.exists(stale) and os.path.exists(other)


# ---------------------------------------------------------------------------------------------------------
# Settings: checked before any directory is made or any data is read


@pytest.mark.parametrize("arg, message", [
    ("--mixture=foo", "--mixture='foo': unknown mixture 'foo': use 'ul2', 't5' or 'prefix_lm'"),
    ("--encoder_len=4", "--encoder_len=4: encoder_len and decoder_len must be at least 8"),
    ("--decoder_len=1", "--decoder_len=1: encoder_len and decoder_len must be at least 8"),
])
def test_train_settings_fail_before_anything_is_read_or_made(tmp_path, monkeypatch, arg, message):
    def no_data(*args):
        raise AssertionError("data was read before the settings were checked")

    monkeypatch.setattr(prepare, "load_meta", no_data)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + [f"--out_dir={tmp_path / 'run'}", arg])
    assert message in one_line(e) and not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("script", ["train", "finetune"])
def test_an_empty_or_file_valued_out_dir_is_one_line_before_any_work(tmp_path, monkeypatch, script):
    """--out_dir= (empty), an existing file, a path under a file, a directory nobody may write: one line before
    the data or the model is read (they were FileNotFoundError / FileExistsError tracebacks after both)."""
    def no_data(*args):
        raise AssertionError("data was read before out_dir was checked")

    monkeypatch.setattr(prepare, "load_meta", no_data)
    monkeypatch.setattr(finetune, "load_model", no_data)
    (tmp_path / "a_file").write_text("x")
    main = train.main if script == "train" else finetune.main
    cases = [("", "--out_dir is empty"), (str(tmp_path / "a_file"), "is a file, not a directory"),
             (str(tmp_path / "a_file" / "run"), "is a file, so no directory can be made under it")]
    for out_dir, message in cases:
        with pytest.raises(SystemExit) as e:
            main(TINY[:1] + ["--device=cpu", f"--out_dir={out_dir}"])
        assert message in one_line(e)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (the tests may run as root, which writes anywhere)
    with pytest.raises(SystemExit) as e:
        main(TINY[:1] + ["--device=cpu", f"--out_dir={tmp_path / 'run'}"])
    assert "is not writable by this user (or is on a read-only file system)" in one_line(e)


@pytest.mark.parametrize("arg, message", [
    ("--epochs=1e400", "config key epochs is inf (from --epochs=1e400): it must be a finite number"),
    ("--max_tokens=1e400", "config key max_tokens is inf"),
    (f"--batch_size={10 ** 30}", "is out of range: its size must be below 2**63"),
    (f"--encoder_len={2 ** 63}", "is out of range: its size must be below 2**63"),
])
def test_config_values_that_overflow_are_one_line(tmp_path, arg, message):
    """1e400 parses as inf (OverflowError: cannot convert float infinity to integer, before); ints past int64
    overflowed in numpy / torch ("int too big to convert")."""
    with pytest.raises(SystemExit) as e:
        train.main(TINY + [f"--out_dir={tmp_path / 'run'}", arg])
    assert message in one_line(e) and not os.path.exists(tmp_path / "run")


def test_a_model_that_cannot_be_allocated_is_one_line(tmp_path, sample_dir, monkeypatch):
    """d_model = 2**40: its embedding alone is ~10**17 bytes, past any address space, so the allocation fails
    on every machine (a RuntimeError traceback from the CPU allocator, before)."""
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + [f"--out_dir={tmp_path / 'run'}", f"--d_model={2 ** 40}"])
    assert "the model does not fit in cpu memory" in one_line(e) and "make it smaller" in one_line(e)


@pytest.mark.parametrize("argv, message", [
    (["--workers", "-1"], "--workers -1 must be between 1 and this machine's"),
    (["--workers", str(10 ** 6)], "must be between 1 and this machine's"),
    (["--out-dir", "A_FILE"], "--out-dir=A_FILE is a file, not a directory"),
])
def test_prepare_settings_are_one_line(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "A_FILE").write_text("x")
    with pytest.raises(SystemExit) as e:
        prepare.main(["sample", *argv])
    assert message in one_line(e)


def test_finetune_settings_and_a_missing_init_fail_before_out_dir_is_made(tmp_path, monkeypatch):
    def no_data(*args):
        raise AssertionError("data was read before the settings were checked")

    monkeypatch.setattr(prepare, "load_meta", no_data)
    init = str(tmp_path / "pre.pt")
    checkpoint.save_checkpoint(init, tiny_checkpoint(1))
    out = tmp_path / "ft"
    for argv, message in [([f"--init_from={init}", "--decoder_len=1"], "--decoder_len=1 leaves no room for a summary"),
                          ([f"--init_from={init}", "--encoder_len=5"], "--encoder_len=5: encoder_len=5 leaves no room"),
                          ([f"--init_from={tmp_path / 'missing.pt'}"], "no checkpoint at")]:
        with pytest.raises(SystemExit) as e:
            finetune.main(argv + [f"--out_dir={out}", "--device=cpu"])
        assert message in one_line(e) and not os.path.exists(out)


MEASURE_GENERATION = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
from generate import generate
from model import ROT5, ROT5Config

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

for config, rows, prompt_len, beams, new_tokens in json.loads(sys.argv[1]):
    pid = os.fork()  # one process per size: memory a size freed cannot hide the next size's peak
    if pid:
        os.waitpid(pid, 0)
        continue
    cfg = ROT5Config(**config)
    torch.manual_seed(0)
    model = ROT5(cfg).eval()
    ids = torch.randint(3, 1000, (rows, prompt_len))
    with torch.no_grad():  # a tiny generation first: one-time allocations (kernels, thread state) are not counted
        generate(model, ids[:1, :4], max_new_tokens=2, num_beams=min(beams, 2))
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from the RSS now
        generate(model, ids, torch.ones_like(ids), max_new_tokens=new_tokens, num_beams=beams)
    print(json.dumps([status("VmHWM") - before, torch.get_num_threads()]), flush=True)
    os._exit(0)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures peak RSS through Linux's /proc")
def test_generation_memory_estimate_against_measured_peak_rss(tmp_path):
    """generate.generation_bytes against the peak RSS that generate.generate adds, measured (VmHWM) in a fresh process
    per size: beam search at 180 beams (the logits of every beam, their log-softmax and topk copies dominate),
    3 prompts of 100 beams with T5's relative bias and GQA (attend() copies K/V to every head; topk works on as
    many prompts at once as it has threads), and greedy decoding of 400 prompts. At these sizes (110-151 MB) the
    estimate was 1.5% to 8.9% over the measured peak (1 and 2 threads, Intel Xeon, Sapphire Rapids); the bounds, -5% / +25%, leave room for other CPUs'
    kernels and allocators. (Smaller generations add a few MB of the runtime's own, which the half-of-free-memory
    rule absorbs.)"""
    rope, t5 = asdict(TINY_CFG), {**asdict(TINY_CFG), "position": "t5"}
    sizes = [(rope, 1, 16, 180, 8), (t5, 3, 16, 100, 24), (rope, 400, 8, 1, 8)]
    script = tmp_path / "measure.py"
    script.write_text(MEASURE_GENERATION.format(repo=REPO))
    proc = subprocess.run([sys.executable, str(script), json.dumps(sizes)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    measured = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(measured) == len(sizes), proc.stderr[-2000:]
    for (config, rows, prompt_len, beams, new_tokens), (peak, threads) in zip(sizes, measured):
        estimate = generate.generation_bytes(ROT5Config(**config), rows, prompt_len, beams, new_tokens, threads=threads)
        assert peak >= 100e6 and 0.95 * peak <= estimate <= 1.25 * peak, (config["position"], beams, estimate, peak)


def test_sample_advice_fits_what_it_says(tmp_path, monkeypatch):
    """The largest --num-beams and --max-new-tokens the refusal names pass the check themselves, and one more
    does not (the same estimate, searched)."""
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, tiny_checkpoint(1))
    free = 2 * 10 ** 9
    monkeypatch.setattr(sample, "available_memory", lambda device: free)
    prompt = "Once upon a time there was a dog."
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", path, "--prompt", prompt, "--device", "cpu", "--num-beams", "1200",
                     "--max-new-tokens", "2000"])
    message = one_line(e)
    beams = int(re.search(r"at most ([\d,]+) beams", message).group(1).replace(",", ""))
    tokens = int(re.search(r"at most ([\d,]+) new tokens", message).group(1).replace(",", ""))
    n = len(sample.build_input("continue", prompt, 0, get_tokenizer("mistral"), 128, "R"))
    need = lambda t, k: generate.generation_bytes(TINY_CFG, 1, n, k, t, threads=torch.get_num_threads())  # noqa: E731
    assert 0 < beams < 1200 and 0 < tokens < 2000, message
    assert need(2000, beams) <= free // 2 < need(2000, beams + 1)
    assert need(tokens, 1200) <= free // 2 < need(tokens + 1, 1200)


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", str(10 ** 10)], "new tokens at this beam count"),
    (["--max-new-tokens", "200", "--num-beams", str(10 ** 8)], "beams at this length"),
])
def test_sample_refuses_a_generation_that_cannot_fit(tmp_path, argv, message):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, tiny_checkpoint(1))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", path, "--prompt", "Once upon a time", "--device", "cpu", *argv])
    assert "needs" in one_line(e) and "at most" in one_line(e) and message in one_line(e)


# ---------------------------------------------------------------------------------------------------------
# torchrun restarts


WORKER = """
import os, signal, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import train
attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 0 and rank == 1:  # killed before the process group is up, while rank 0 waits in it
    time.sleep(2)
    os.kill(os.getpid(), signal.SIGKILL)
train.init_process_group("gloo", rank, int(os.environ["WORLD_SIZE"]))
x = torch.ones(1)
dist.all_reduce(x)
print(f"attempt {{attempt}} rank {{rank}}: all_reduce {{x.item():g}}", flush=True)
dist.destroy_process_group()
"""


GLOO_SHUTDOWN = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import train
train.init_process_group("gloo", 0, 1)
model = DDP(torch.nn.Linear(4, 4))  # its constructor imports torch.distributed.nn (through torch._dynamo)
model(torch.ones(2, 4)).sum().backward()
del model
dist.destroy_process_group()
print(" ".join(sorted(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task"))))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through Linux's /proc")
def test_destroy_process_group_ends_the_gloo_threads(tmp_path):
    """A finished torchrun job must exit cleanly. torch.distributed.nn takes group.WORLD as a default argument
    when imported; imported by DDP after the group exists, it kept the group alive past destroy_process_group,
    and gloo's worker and network threads ran on while the interpreter shut down (a worker of a finished job
    then died of "terminate called without an active exception"). train.init_process_group imports it first."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "shutdown.py"
    script.write_text(GLOO_SHUTDOWN.format(repo=REPO))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads = proc.stdout.split()
    assert threads and not [t for t in threads if "gloo" in t], threads


def test_a_torchrun_restart_after_an_early_kill_connects(tmp_path):
    """With torchrun's shared store and no per-attempt prefix, the restarted workers read the dead attempt's
    gloo addresses and fail with "connectFullMesh failed ... Connection refused" (train.init_process_group)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--max-restarts=1", str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (the two workers share one stdout pipe: their lines may interleave, so find them, not split them)
    assert sorted(re.findall(r"attempt \d+ rank \d+: all_reduce \d+", proc.stdout)) == \
        ["attempt 1 rank 0: all_reduce 2", "attempt 1 rank 1: all_reduce 2"]
