"""prepare.py on any corpus (text, JSON Lines, Parquet, a Hugging Face dataset), from the bundled real stories
written out in each format: the same documents give the same shards whatever the format, validation given
or held out by a fraction and a seed, the hub path with its loader replaced by the local records, one-line
errors, and train.py on the result."""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

N_STORIES = 120  # real stories of data/sample/stories.txt: a corpus prepares in well under a second


@pytest.fixture(scope="module")
def stories() -> list[str]:
    """The first N_STORIES real stories without a blank line inside (a few of the 7,204 have one), so that a
    blank line can separate them."""
    with open(os.path.join(prepare.SAMPLE_DIR, "stories.txt"), encoding="utf-8") as f:
        records = [r.strip() for r in f.read().split(prepare.EOT.decode()) if r.strip()]
    return [r for r in records if not re.search(r"\n\s*\n", r)][:N_STORIES]


def write_jsonl(path, texts: list[str], field: str = "text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, field: t}) + "\n")
    return str(path)


def write_parquet(path, texts: list[str | None], field: str = "text") -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(texts))), field: texts}), str(path), row_group_size=50)
    return str(path)


def decoded(out: str, split: str) -> list[str]:
    tok = get_tokenizer("mistral")
    return [tok.decode(d) for d in prepare.load_documents(out, split)]


def shard(out: str, split: str) -> bytes:
    with open(os.path.join(out, f"{split}.bin"), "rb") as f:
        return f.read()


def test_every_format_gives_the_same_shards(tmp_path, stories, capsys):
    """A blank-line separated text file, JSON Lines and Parquet holding the same stories, and a given validation
    file: the documents come back exactly, and the shards are byte-identical across the formats."""
    train, val = stories[:100], stories[100:]
    (tmp_path / "train.txt").write_text("\n\n".join(train) + "\n", encoding="utf-8")
    (tmp_path / "val.txt").write_text("\n\n\n".join(val), encoding="utf-8")  # (2 blank lines are one separator)
    text = str(tmp_path / "mine")
    meta = prepare.prepare_corpus("text", [str(tmp_path / "train.txt")], text, val=[str(tmp_path / "val.txt")],
                                  sample_by="paragraph", workers=2)
    assert decoded(text, "train") == train and decoded(text, "val") == val
    assert meta["dataset"] == "mine" and meta["reference"] is None
    assert [(s["split"], s["format"], s["sample_by"]) for s in meta["sources"]] == \
        [("val", "text", "paragraph"), ("train", "text", "paragraph")]
    table = capsys.readouterr().out
    assert "| mine train" in table and "seed tokens" not in table  # named, and not compared with TinyStories'
    jsonl = str(tmp_path / "jsonl")
    prepare.prepare_corpus("jsonl", [write_jsonl(tmp_path / "train.jsonl", train, "story")], jsonl,
                           val=[write_jsonl(tmp_path / "val.jsonl", val, "story")], text_field="story", workers=1)
    parquet = str(tmp_path / "parquet")
    # two training files, read in order
    prepare.prepare_corpus("parquet", [write_parquet(tmp_path / "a.parquet", train[:60]),
                                       write_parquet(tmp_path / "b.parquet", train[60:])], parquet,
                           val=[write_parquet(tmp_path / "v.parquet", val)], workers=1)
    for split in ("train", "val"):
        assert shard(text, split) == shard(jsonl, split) == shard(parquet, split)
    # the same again is up to date; a changed source is rebuilt
    prepare.prepare_corpus("jsonl", [str(tmp_path / "train.jsonl")], jsonl, val=[str(tmp_path / "val.jsonl")],
                           text_field="story", workers=1)
    assert "up to date" in capsys.readouterr().out
    write_jsonl(tmp_path / "val.jsonl", val[:5], "story")
    prepare.prepare_corpus("jsonl", [str(tmp_path / "train.jsonl")], jsonl, val=[str(tmp_path / "val.jsonl")],
                           text_field="story", workers=1)
    assert decoded(jsonl, "val") == val[:5]


def test_lines_eot_and_whole_files(tmp_path, stories):
    """--sample-by line (the default: one document per line, blank lines skipped and counted), eot (the
    TinyStories format: the same shards as the tinystories preset) and document (a file is a document)."""
    lines = [" ".join(s.split()) for s in stories]
    (tmp_path / "lines.txt").write_text("\n".join(lines[:50]) + "\n\n" + "\r\n".join(lines[50:]) + "\r\n",
                                        encoding="utf-8")
    out = str(tmp_path / "lines")
    meta = prepare.prepare_corpus("text", [str(tmp_path / "lines.txt")], out, val_fraction=0.1, workers=1)
    assert sorted(decoded(out, "train") + decoded(out, "val")) == sorted(lines)
    assert meta["splits"]["train"]["skipped"] + meta["splits"]["val"]["skipped"] == 1  # the blank line
    eot = "".join(f"{s}\n{prepare.EOT.decode()}\n" for s in stories[:100])
    (tmp_path / "t.txt").write_text(eot, encoding="utf-8")
    (tmp_path / "v.txt").write_text("".join(f"{s}\n{prepare.EOT.decode()}\n" for s in stories[100:]), encoding="utf-8")
    mine, preset = str(tmp_path / "eot"), str(tmp_path / "preset")
    prepare.prepare_corpus("text", [str(tmp_path / "t.txt")], mine, val=[str(tmp_path / "v.txt")], sample_by="eot",
                           workers=1)
    prepare.prepare("tinystories", preset, str(tmp_path / "t.txt"), str(tmp_path / "v.txt"), workers=1)
    assert shard(mine, "train") == shard(preset, "train") and shard(mine, "val") == shard(preset, "val")
    files = []
    for i, s in enumerate(stories[:4]):
        (tmp_path / f"doc{i}.txt").write_text(s + "\n", encoding="utf-8")
        files.append(str(tmp_path / f"doc{i}.txt"))
    whole = str(tmp_path / "whole")
    prepare.prepare_corpus("text", files[:3], whole, val=files[3:], sample_by="document", workers=1)
    assert decoded(whole, "train") == stories[:3] and decoded(whole, "val") == [stories[3]]


def test_held_out_split_depends_on_the_fraction_and_the_seed_only(tmp_path, stories):
    path = write_parquet(tmp_path / "c.parquet", [*stories[:60], None, *stories[60:]])  # a null: a missing text

    def split(seed: int, workers: int = 1, fraction: float = 0.2) -> tuple[list[str], list[str], dict]:
        out = str(tmp_path / f"s{seed}_{workers}_{fraction}")
        meta = prepare.prepare_corpus("parquet", [path], out, val_fraction=fraction, seed=seed, workers=workers)
        return decoded(out, "train"), decoded(out, "val"), meta

    train, val, meta = split(1)
    assert 10 <= len(val) <= 40 and len(train) + len(val) == len(stories)
    # a partition of the documents, each side in corpus order
    assert sorted(train + val) == sorted(stories) and train == [s for s in stories if s in set(train)]
    assert meta["splits"]["train"]["skipped"] + meta["splits"]["val"]["skipped"] == 1  # the null
    assert meta["sources"][0]["split"] == "train+val" and meta["sources"][0]["seed"] == 1
    assert split(1, workers=2)[:2] == (train, val)      # the pool changes nothing
    assert split(2)[1] != val                            # another seed, other validation documents
    with pytest.raises(ValueError, match="held out for validation .*raise the fraction"):
        split(1, fraction=1e-6)
    assert not os.path.exists(tmp_path / "s1_1_1e-06" / "train.bin")  # nothing kept


def hub_records(texts: list[str]) -> list[dict]:
    return [{"text": t, "id": i} for i, t in enumerate(texts)]


def test_hub_dataset_is_the_same_code_with_a_download_in_front(tmp_path, stories, monkeypatch, capsys):
    """prepare.py hf:NAME with the hub loader replaced by the local records (the real one streams them with
    datasets.load_dataset): the train and validation splits, the write-up's counts for TinyStories only."""
    opened = []
    monkeypatch.setattr(prepare, "hf_splits", lambda name, config: opened.append((name, config)) or
                        {"train": hub_records(stories[:100]), "validation": hub_records(stories[100:])})
    out = str(tmp_path / "TinyStories")
    meta = prepare.prepare_corpus("hf:roneneldan/TinyStories", out_dir=out, workers=1)
    assert opened == [("roneneldan/TinyStories", None)]
    assert decoded(out, "train") == stories[:100] and decoded(out, "val") == stories[100:]
    assert meta["reference"] == "tinystories" and meta["command"].startswith("python prepare.py hf:roneneldan/TinyStories")
    assert "494,907,437" in capsys.readouterr().out  # TinyStories: compared with the write-up's count
    jsonl = str(tmp_path / "jsonl")
    prepare.prepare_corpus("jsonl", [write_jsonl(tmp_path / "t.jsonl", stories[:100])], jsonl,
                           val=[write_jsonl(tmp_path / "v.jsonl", stories[100:])], workers=1)
    assert shard(out, "train") == shard(jsonl, "train") and shard(out, "val") == shard(jsonl, "val")
    # another dataset without a validation split: held out, and no comparison
    monkeypatch.setattr(prepare, "hf_splits", lambda name, config: {"train": hub_records(stories)})
    other = prepare.prepare_corpus("hf:someone/stories", out_dir=str(tmp_path / "other"), val_fraction=0.2, workers=1)
    assert other["reference"] is None and "seed tokens" not in capsys.readouterr().out
    assert other["splits"]["val"]["documents"] > 0
    with pytest.raises(ValueError, match=r"hf:someone/stories has no split 'valid' \(it has 'train'\)"):
        prepare.prepare_corpus("hf:someone/stories", out_dir=str(tmp_path / "x"), val_split="valid")

    def dropped():  # the connection drops mid-stream
        yield {"text": stories[0]}
        raise ConnectionError("Connection reset by peer")

    monkeypatch.setattr(prepare, "hf_splits", lambda name, config: {"train": dropped()})
    with pytest.raises(ValueError, match=r"reading hf:someone/stories split train failed after 1 records "
                                         r"\(ConnectionError: Connection reset by peer\): run prepare.py again"):
        prepare.prepare_corpus("hf:someone/stories", out_dir=str(tmp_path / "dropped"), workers=1)
    assert not os.path.exists(tmp_path / "dropped" / "train.bin")


def test_missing_optional_packages_are_one_line(tmp_path, stories, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(SystemExit, match=r"^prepare.py: prepare.py hf:a/b needs the datasets package: pip install "
                                         r"datasets$"):
        prepare.main(["hf:a/b", "--out-dir", str(tmp_path / "o")])
    path = write_parquet(tmp_path / "c.parquet", stories[:5])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SystemExit, match="reading Parquet needs the pyarrow package: pip install pyarrow"):
        prepare.main(["parquet", path, "--out-dir", str(tmp_path / "o")])


@pytest.mark.parametrize("make, argv, message", [
    (lambda d, s: (d / "c.txt").write_text(s[0]), ["{d}/c.txt"],
     r"unknown SOURCE '.*c.txt': .*; for this file: python prepare.py text .*c.txt$"),
    (lambda d, s: write_jsonl(d / "c.jsonl", s[:3], "story"), ["jsonl", "{d}/c.jsonl"],
     r"c.jsonl line 1 has no field 'text' \(it has 'id', 'story'\): name the one that holds the text with --text-field"),
    (lambda d, s: (d / "c.jsonl").write_text(json.dumps({"text": s[0]}) + "\n" + s[1] + "\n"), ["jsonl", "{d}/c.jsonl"],
     r"c.jsonl line 2 is not JSON \(.*\): JSON Lines holds one object per line"),
    (lambda d, s: (d / "c.jsonl").write_text(json.dumps({"text": 7}) + "\n"), ["jsonl", "{d}/c.jsonl"],
     r"c.jsonl line 1: field 'text' holds int data, not text"),
    (lambda d, s: (d / "c.parquet").write_text(s[0]), ["parquet", "{d}/c.parquet"], r"c.parquet is not a readable Parquet file"),
    (lambda d, s: write_parquet(d / "c.parquet", s[:3]), ["parquet", "{d}/c.parquet", "--text-field", "id"],
     r"c.parquet: column 'id' is int64, not text"),
    (lambda d, s: (d / "c.txt").write_text("\n".join(" ".join(x.split()) for x in s) * 120), ["text", "{d}/c.txt",
     "--sample-by", "paragraph"], r"c.txt: over 1,048,576 bytes without a blank line \(--sample-by paragraph\): .*--sample-by"),
    (lambda d, s: (d / "c.txt").write_text(s[0]), ["text", "{d}/c.txt", "--text-field", "x"],
     r"--text-field does not apply to text \(it is for jsonl, parquet, hf sources\)"),
    (lambda d, s: (d / "c.txt").write_text(s[0]), ["text", "{d}/c.txt", "--val", "{d}/c.txt", "--val-fraction", "0.1"],
     r"--val-fraction holds validation data out of the training data: give it, or the validation data \(--val / --val-split\), not both"),
    (lambda d, s: None, ["text"], r"`prepare.py text` needs the files to read"),
    (lambda d, s: (d / "c.txt").write_text(s[0]), ["sample", "{d}/c.txt"], r"sample takes local files as --train FILE"),
])
def test_bad_input_is_one_line(tmp_path, stories, make, argv, message):
    make(tmp_path, stories)
    with pytest.raises(SystemExit, match=r"^prepare.py: (.*/)?" + message) as e:
        prepare.main([a.format(d=tmp_path) for a in argv] + ["--out-dir", str(tmp_path / "out"), "--workers", "1"])
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out" / "meta.json")


def test_train_on_your_own_corpus(tmp_path, stories, monkeypatch):
    """`prepare.py jsonl ... --out-dir data/mine`, then `train.py --dataset=mine`; a damaged shard's error
    names the command that rebuilds it."""
    import train

    monkeypatch.chdir(tmp_path)
    prepare.main(["jsonl", write_jsonl(tmp_path / "c.jsonl", stories), "--out-dir", "data/mine", "--val-fraction",
                  "0.1", "--workers", "1"])
    result = train.main(["--dataset=mine", "--device=cpu", "--d_model=32", "--n_heads=2", "--head_dim=16",
                         "--n_kv_heads=2", "--d_ff=64", "--n_encoder_layers=1", "--n_decoder_layers=1",
                         "--encoder_len=64", "--decoder_len=32", "--batch_size=4", "--micro_batch_size=4",
                         "--epochs=0.05", "--eval_docs=4", "--eval_batch_size=16", "--dtype=float32",
                         "--out_dir=out/mine"])
    assert result["max_steps"] == 2 and np.isfinite(result["full_val_loss"])
    with open("data/mine/val.bin", "r+b") as f:
        f.seek(10)
        f.write(b"\x01\x00")
    with pytest.raises(ValueError, match=r"run `python prepare.py jsonl .*c.jsonl --out-dir data/mine --val-fraction "
                                         r"0.1` again"):
        prepare.load_documents("data/mine", "val")
