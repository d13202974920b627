"""prepare.py on the bundled real TinyStories sample: round-trips, index invariants, pairs, re-runs, bad input."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

STORIES = os.path.join(prepare.SAMPLE_DIR, "stories.txt")
VALID = os.path.join(prepare.SAMPLE_DIR, "valid.txt")
INSTRUCT = os.path.join(prepare.SAMPLE_DIR, "instruct.txt")
SEP = "<|endoftext|>"


def records(path: str) -> list[str]:
    """The test's own reading of the source: split on the separator, strip, drop empties."""
    with open(path, encoding="utf-8") as f:
        return [r.strip() for r in f.read().split(SEP) if r.strip()]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("mistral")


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("sample"))
    prepare.prepare("sample", d, workers=2)  # the process Pool path
    return d


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("sample_instruct"))
    prepare.prepare("sample_instruct", d, workers=1)
    return d


def test_sample_round_trip(sample_dir, tok):
    """train = the 7,204 train-split stories of stories.txt, val = the 966 V1-validation stories of valid.txt."""
    recs, val_recs = records(STORIES), records(VALID)
    train, val = prepare.load_documents(sample_dir, "train"), prepare.load_documents(sample_dir, "val")
    assert (len(recs), len(train), len(val_recs), len(val)) == (7204, 7204, 966, 966)
    # the validation split is held out: no story of it occurs in the training split (whitespace collapsed)
    assert not {" ".join(r.split()) for r in recs} & {" ".join(r.split()) for r in val_recs}
    docs = list(train) + list(val)
    assert all(d.dtype == np.uint16 and tok.eos_id not in d for d in docs)
    mismatches = [i for i, (d, r) in enumerate(zip(docs, recs + val_recs)) if tok.decode(d) != r]
    assert mismatches == []
    assert np.array_equal(docs[0], tok.encode(recs[0]))  # the same ids as encoding one record alone
    assert tok.decode(val[0]).startswith("Spot. Spot saw the shiny car")  # the opening of V1's validation split


def test_index_offsets_and_meta_counts(sample_dir, tok, tmp_path):
    meta = prepare.load_meta(sample_dir)
    assert meta["tokenizer"] == "mistral" and meta["vocab_size"] == tok.vocab_size and meta["eos_id"] == tok.eos_id
    assert meta["tokenizer_sha256"] == prepare.sha256_file(tok.model_file)
    assert [(s["split"], s["sha256"]) for s in meta["sources"]] == [("train", prepare.sha256_file(STORIES)),
                                                                    ("val", prepare.sha256_file(VALID))]
    for split in ("train", "val"):
        tokens = np.fromfile(os.path.join(sample_dir, f"{split}.bin"), dtype=np.uint16)
        offsets = np.load(os.path.join(sample_dir, f"{split}.idx.npy"))
        c = meta["splits"][split]
        assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(tokens)
        assert len(offsets) == c["documents"] + 1
        assert np.all(tokens[offsets[1:] - 1] == tok.eos_id)  # an eos closes every document ...
        assert np.count_nonzero(tokens == tok.eos_id) == c["documents"]  # ... and appears nowhere else
        assert len(tokens) == c["tokens"] + c["documents"] and c["skipped"] == c["bad_bytes"] == 0
    assert all(s["start"] == 0 and s["stop"] == os.path.getsize(s["path"]) for s in meta["sources"])  # whole files
    # parallel and serial tokenization write byte-identical shards
    serial = str(tmp_path / "serial")
    prepare.prepare("sample", serial, workers=1)
    for name in ("train.bin", "train.idx.npy", "val.bin", "val.idx.npy"):
        with open(os.path.join(sample_dir, name), "rb") as a, open(os.path.join(serial, name), "rb") as b:
            assert a.read() == b.read(), name


def test_instruct_pairs_match_the_real_records(instruct_dir, tok):
    recs = records(INSTRUCT)
    assert len(recs) == 3
    pairs = list(prepare.load_pairs(instruct_dir, "train")) + list(prepare.load_pairs(instruct_dir, "val"))
    docs = list(prepare.load_documents(instruct_dir, "train")) + list(prepare.load_documents(instruct_dir, "val"))
    assert len(pairs) == len(docs) == 3
    for rec, doc, (story, summary) in zip(recs, docs, pairs):
        assert tok.decode(doc) == rec  # pre-training sees the whole record
        # in all 3 real records Story is the last field and Summary is one line
        assert tok.decode(summary) == re.search(r"^Summary: (.*)$", rec, re.M).group(1).strip()
        assert tok.decode(story) == rec.split("Story:", 1)[1].strip()
        assert story.dtype == summary.dtype == np.uint16
    # fields in any order: the 3 records have Summary first, third and third
    assert [list(prepare.parse_instruct(r))[0] for r in recs] == ["Features", "Summary", "Random sentence"]


def test_rerun_is_a_noop(sample_dir, capsys):
    def mtimes() -> dict[str, int]:
        return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
                for r, _, fs in os.walk(sample_dir) for f in fs}

    before = mtimes()
    capsys.readouterr()
    prepare.prepare("sample", sample_dir, workers=2)
    assert "up to date" in capsys.readouterr().out
    assert mtimes() == before


def test_a_worker_that_cannot_build_its_tokenizer_is_an_error_not_a_hang():
    """The workers build the tokenizer by name; when that fails, its error reaches the caller (a worker pool
    whose initializer raises would restart workers forever while the caller waited)."""
    chunks = ((None, c) for c in prepare.iter_chunks(STORIES))
    with pytest.raises(ValueError, match="unknown tokenizer 'no-such-tokenizer'"):
        list(prepare.tokenize_in_order(chunks, SimpleNamespace(name="no-such-tokenizer"), workers=2))


def tokenizing_workers() -> list[int]:
    """The children of this process's multiprocessing fork server: the tokenizing workers."""
    parents, commands = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                commands[int(pid)] = f.read()
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            pass
    servers = {p for p, parent in parents.items() if parent == os.getpid() and b"forkserver" in commands.get(p, b"")}
    return [p for p, parent in parents.items() if parent in servers]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers in /proc")
def test_a_killed_worker_is_one_line_not_a_hang(tok):
    """A worker killed while the pool runs (the kernel's OOM killer) ends the run with one line naming the fix; the
    caller does not wait forever for the results it would have sent. (Blocks of one story: with 1 MB blocks queued
    for the killed workers, CPython 3.11's executor hung once here itself, as in python/cpython#94777.)"""
    import signal

    stories = [(r + "\n" + SEP + "\n").encode() for r in records(STORIES)[:400]]
    results = prepare.tokenize_in_order(((None, c) for c in stories), tok, workers=2)
    next(results)  # the workers are up and busy
    workers = tokenizing_workers()
    assert 1 <= len(workers) <= 2  # (the executor starts workers as tasks arrive)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(SystemExit) as e:
        for _ in results:
            pass
    assert "a tokenizing worker process died" in str(e.value) and "--workers 1" in str(e.value)
    assert "\n" not in str(e.value)


def test_local_files_and_rebuild_on_change(tmp_path, capsys):
    stories = records(STORIES)[:40]
    train, val, out = tmp_path / "train.txt", tmp_path / "val.txt", str(tmp_path / "out")
    train.write_text("".join(f"{s}\n{SEP}\n" for s in stories[:30]), encoding="utf-8")
    val.write_text("".join(f"{s}\n{SEP}\n" for s in stories[30:]), encoding="utf-8")
    prepare.prepare("tinystories", out, str(train), str(val), workers=1)
    assert "494,907,437" in capsys.readouterr().out  # the seed's reference numbers are printed beside ours
    assert len(prepare.load_documents(out, "val")) == 10
    val.write_text("".join(f"{s}\n{SEP}\n" for s in stories[30:35]), encoding="utf-8")
    prepare.prepare("tinystories", out, str(train), str(val), workers=1)  # changed source -> rebuilt
    assert "up to date" not in capsys.readouterr().out
    assert len(prepare.load_documents(out, "val")) == 5


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_empty_file(tmp_path):
    empty = _write(tmp_path / "empty.txt", b"")
    with pytest.raises(ValueError, match="is empty"):
        prepare.prepare("tinystories", str(tmp_path / "out"), empty, empty, workers=1)
    assert not os.path.exists(tmp_path / "out" / "meta.json")


def test_a_malformed_val_file_fails_before_train_is_tokenized(tmp_path, monkeypatch):
    """The val split is written first: a wrong --val costs seconds, not the train file's tokenization."""
    train = _write(tmp_path / "train.txt", "".join(f"{s}\n{SEP}\n" for s in records(STORIES)[:30]).encode())
    empty = _write(tmp_path / "val.txt", b"")
    written = []
    real_write_split = prepare.write_split
    monkeypatch.setattr(prepare, "write_split", lambda out, split, *a, **k: written.append(split) or
                        real_write_split(out, split, *a, **k))
    with pytest.raises(ValueError, match="val.txt is empty"):
        prepare.prepare("tinystories", str(tmp_path / "out"), train, empty, workers=1)
    assert written == ["val"] and not os.path.exists(tmp_path / "out" / "train.bin")


def test_missing_separators(tmp_path):
    joined = "\n\n".join(records(STORIES)[:5]).encode()
    no_sep = _write(tmp_path / "no_sep.txt", joined)
    with pytest.raises(ValueError, match=r"no `<\|endoftext\|>` separator.*TinyStories file"):
        prepare.prepare("tinystories", str(tmp_path / "out"), no_sep, no_sep, workers=1)
    huge = _write(tmp_path / "huge.txt", "\n\n".join(records(STORIES)).encode())  # 2.9 MB, no separator
    with pytest.raises(ValueError, match=r"record of [\d,]+\+ bytes.*is this a TinyStories file\?"):
        prepare.prepare("tinystories", str(tmp_path / "out"), huge, huge, workers=1)
    assert not os.listdir(tmp_path / "out")  # temp files were removed too


def test_non_utf8_bytes_are_counted(tmp_path, tok):
    recs = records(STORIES)[:8]
    raw = [r.encode() for r in recs]
    raw[2] = raw[2][:50] + b"\xff\xfe" + raw[2][50:]  # 2 invalid start bytes
    raw[5] = raw[5][:20] + b"\xc3" + raw[5][20:]  # a truncated 2-byte sequence (before an ASCII byte)
    # a leading separator and a doubled one make 2 empty records: skipped and counted, not written
    body = b"".join(r + b"\n<|endoftext|>\n" + (b"\n<|endoftext|>\n" if i == 3 else b"") for i, r in enumerate(raw))
    bad = _write(tmp_path / "bad.txt", b"<|endoftext|>\n" + body)
    out = str(tmp_path / "out")
    meta = prepare.prepare("tinystories", out, bad, bad, workers=1)
    c = meta["splits"]["train"]
    assert (c["bad_bytes"], c["documents"], c["skipped"]) == (3, 8, 2)
    docs = prepare.load_documents(out, "train")
    assert tok.decode(docs[2]) == recs[2][:50] + "\ufffd\ufffd" + recs[2][50:]
    assert tok.decode(docs[5]) == recs[5][:20] + "\ufffd" + recs[5][20:]
    assert [tok.decode(docs[i]) for i in (0, 1, 3, 4, 6, 7)] == [recs[i] for i in (0, 1, 3, 4, 6, 7)]


def test_instruct_record_without_story_is_skipped_for_pairs(tmp_path, tok):
    recs = records(INSTRUCT)
    no_story = recs[1].split("Story:", 1)[0].strip()  # the "Lily steals a bike" record, cut before its story
    train = _write(tmp_path / "train.txt", f"{recs[0]}\n{SEP}\n{no_story}\n{SEP}\n{recs[2]}\n{SEP}\n".encode())
    out = str(tmp_path / "out")
    meta = prepare.prepare("tinystories_instruct", out, train, INSTRUCT, workers=1)
    c = meta["splits"]["train"]
    assert c["documents"] == 3 and c["pairs"]["pairs"] == 2 and c["pairs"]["skipped"] == 1
    pairs = prepare.load_pairs(out, "train")
    assert [tok.decode(s) for s, _ in pairs] == [recs[0].split("Story:", 1)[1].strip(),
                                                 recs[2].split("Story:", 1)[1].strip()]
    assert tok.decode(prepare.load_documents(out, "train")[1]) == no_story  # still pre-training text


def test_offline_download_fails_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, prepare.__file__, "tinystories", "--out-dir", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "could not download roneneldan/TinyStories" in lines[0]
    assert "--train FILE --val FILE" in lines[0] and "python prepare.py sample" in lines[0]


def test_vocab_over_uint16_is_refused_before_writing(tmp_path):
    big = SimpleNamespace(name="big", vocab_size=70_000)
    with pytest.raises(ValueError, match="uint16"):
        prepare.prepare("sample", str(tmp_path / "out"), workers=1, tokenizer=big)
    assert not os.path.exists(tmp_path / "out")


def test_reader_errors(sample_dir, tmp_path):
    with pytest.raises(ValueError, match=r"has no train split.*run `python prepare.py sample` first"):
        prepare.load_documents(str(tmp_path / "sample"), "train")
    with pytest.raises(ValueError, match="has no test split"):
        prepare.load_documents(sample_dir, "test")
    with pytest.raises(ValueError, match="sample_instruct"):
        prepare.load_pairs(sample_dir, "train")
    # a truncated shard no longer matches its index
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("meta.json", "train.idx.npy", "val.bin", "val.idx.npy"):
        (broken / name).write_bytes(open(os.path.join(sample_dir, name), "rb").read())
    (broken / "train.bin").write_bytes(open(os.path.join(sample_dir, "train.bin"), "rb").read()[:-100])
    with pytest.raises(ValueError, match="does not match its index"):
        prepare.load_documents(str(broken), "train")


def test_documents_sequence_api(sample_dir):
    docs = prepare.load_documents(sample_dir, "val")
    assert np.array_equal(docs[-1], docs[len(docs) - 1]) and len(docs[1:4]) == 3
    assert np.array_equal(docs.lengths, [len(d) for d in docs])
    with pytest.raises(IndexError):
        docs[len(docs)]
    import pickle

    clone = pickle.loads(pickle.dumps(docs))  # re-opens the memmap instead of copying the tokens
    assert len(pickle.dumps(docs)) < 1000 and np.array_equal(clone[5], docs[5])
