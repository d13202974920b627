"""Text -> token arrays on disk (TinyStories, or any corpus), and the readers every other script uses.

The big idea: a split is ONE flat array of uint16 token ids with an eos after every document, plus an
index of where each document starts. Training code memory-maps the array and slices documents out of it
in O(1), so a 500M-token corpus costs no RAM and no parsing at train time.

    data/<dataset>/
        meta.json             tokenizer (name, sha256 of its model file, vocab size, special ids), per-split
                              counts (documents, tokens, skipped, bad bytes, pairs), source files with sha256,
                              shard_sha256 (sha256 of every file below). Written last: a directory without
                              it is unfinished.
        train.bin             uint16 [doc_0, eos, doc_1, eos, ...]                          (n_tokens + n_docs,)
        train.idx.npy         int64 start offset of every document, then the end of the array (n_docs + 1,)
        val.bin, val.idx.npy  the same for the validation split
        pairs/                instruct datasets only, for fine-tuning (story -> summary):
            train_story.bin   train_story.idx.npy     story token arrays, same layout as above
            train_summary.bin train_summary.idx.npy   summary i belongs to story i
            val_story.bin ... val_summary.idx.npy

    document i = bin[idx[i] : idx[i+1] - 1]      (bin[idx[i+1] - 1] is the eos)

Readers (the public API of this file): load_documents(dir, split) and load_pairs(dir, split) return
Sequences of np.uint16 arrays without the eos, backed by np.memmap; load_meta(dir) returns meta.json;
load_tokenizer(dir) the tokenizer that made the directory. Nothing damaged gets past them: they check sizes,
the index, that every id is text and every shard's sha256 against meta.json (_verify, < 2 s per 700M tokens),
and the tokenizer against the one meta.json recorded (check_tokenizer), each failure one line with the fix.

Usage:
    python prepare.py sample               # bundled real sample data/sample/{stories,valid}.txt -> data/sample/
    python prepare.py sample_instruct      # 3 real Instruct records data/sample/instruct.txt -> data/sample_instruct/
    python prepare.py tinystories          # download TinyStories-{train,valid}.txt from the Hugging Face hub
    python prepare.py tinystories_instruct # download TinyStoriesInstruct-{train,valid}.txt
    python prepare.py tinystories --train TinyStories-train.txt --val TinyStories-valid.txt   # local files
    options: --out-dir DIR (default data/<dataset>), --workers N (default: all cores),
             --tokenizer mistral|gpt2|t5:HUB_ID_OR_DIR (T5's own, to fine-tune an HF T5 / FLAN-T5 with finetune.py)
                         |hf:HUB_ID_OR_DIR (an HF model's tokenizer.json, to adapt a Llama / Mistral with train.py)

  Any corpus (prepare_corpus; then `python train.py --dataset=NAME` reads data/NAME):
    python prepare.py text my_corpus.txt --out-dir data/mine       # one document per line
    python prepare.py text notes.txt --sample-by paragraph         # documents separated by blank lines
    python prepare.py text a.txt b.txt --sample-by document        # one document per file (also: eot)
    python prepare.py jsonl corpus.jsonl --text-field content --val valid.jsonl
    python prepare.py parquet train-*.parquet --text-field text
    python prepare.py hf:roneneldan/TinyStories --text-field text  # streamed from the hub (pip install datasets)
    validation: --val FILE (repeatable) / --val-split NAME (hf; by default its "validation" split if it has
    one), else --val-fraction F of the documents (default HELD_OUT) held out, drawn per document with --seed.

Details
- Input format (presets): records separated by `<|endoftext|>` lines (the TinyStories .txt files). Each record is
  stripped of surrounding whitespace; empty records are skipped and counted. Bytes that are not UTF-8 are
  decoded as U+FFFD and counted ("bad bytes"), never dropped silently.
- Instruct records are fields "Summary:", "Story:", "Features:", "Words:", "Random sentence:" at line
  starts, in any order. Pre-training sees the WHOLE record as unlabeled text (as the seed did, following
  T5's finding that task data helps as unlabeled data); fine-tuning gets (Story, Summary) pairs. A record
  without a Story or a Summary is still pre-training text, but is skipped (and counted) for pairs.
- `sample` has a genuine validation file: data/sample/valid.txt holds 966 stories of the official TinyStories
  V1 validation split, stories.txt 7,204 train-split stories (data/sample/SOURCES.md). `sample_instruct` has
  none: the last VAL_FRACTION of its records (1 of the 3) becomes the val split, which depends only on the file.
- Downloads use huggingface_hub.hf_hub_download, which caches the files (under HF_HOME, by default
  ~/.cache/huggingface), resumes interrupted downloads, and honours HF_ENDPOINT (mirrors), HF_TOKEN and
  HF_HUB_OFFLINE by itself; nothing here re-implements that.
- Tokenizer: tokenizer.get_tokenizer (Mistral SentencePiece by default; `--tokenizer gpt2` uses tiktoken,
  which downloads its BPE file once into TIKTOKEN_CACHE_DIR and then works offline; `--tokenizer
  t5:google/flan-t5-base` is T5's spiece.model, from the hub like the data, or from a local directory; `--tokenizer
  hf:HuggingFaceTB/SmolLM2-135M` an HF model's tokenizer.json, read with `tokenizers`). Ids are stored as
  uint16, so a vocabulary over 65,536 ids is refused before anything is written.
- Any corpus is read as a stream too (text and JSON Lines in CHUNK_BYTES reads, Parquet PARQUET_ROWS rows at
  a time, a hub dataset record by record through datasets' streaming mode), so it never has to fit in memory;
  the parent process cuts documents apart and the workers tokenize them. JSON Lines must be UTF-8 (JSON is);
  a null or missing text is skipped and counted; pyarrow (Parquet) and datasets (hf:) are optional, one line
  naming the pip install when missing. Documents longer than train.py's windows are cropped there (ul2.py).
  The token table names the directory; only a TinyStories source is compared with the write-up's counts.
- Speed: the file is streamed in CHUNK_BYTES blocks cut at record boundaries (never loaded whole); a
  pool of worker processes tokenizes blocks in parallel, each worker building its tokenizer once and encoding
  a whole block of records in one batched SentencePiece call; the parent only writes results, in file order.
  bench.py times tokenize_file(), the same generator prepare() writes to disk from.
- Re-running with the same sources (sha256) and tokenizer (sha256 of its model file), over shards that still
  pass the readers' checks (their sha256 included), prints "up to date" and touches nothing; a damaged
  shard is rebuilt. Every file is written by diskio.atomic_write (temp file in the same directory, fsync,
  os.replace); meta.json is removed first and written last, so a crash never leaves a meta.json that
  describes other shards, and the temp files a killed run left are removed by the next one. A full disk is
  one line (diskio.WriteFailed).
"""
from __future__ import annotations

import argparse
import codecs
import hashlib
import importlib
import itertools
import json
import multiprocessing as mp
import os
import re
import shlex
import signal
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from typing import NamedTuple

import numpy as np

from diskio import atomic_write, check_out_dir, first_line, remove_stale_temps
from tokenizer import Tokenizer, get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_DIR = os.path.join(HERE, "data", "sample")
FORMAT = 1  # bump when the on-disk layout changes: older directories then count as out of date
EOT = b"<|endoftext|>"
CHUNK_BYTES = 1 << 20  # ~250k tokens per task: big enough to amortise IPC, small enough to balance cores
MAX_RECORD_BYTES = 1 << 20  # TinyStories records are < 10 kB; a 1 MB "record" means the separators are missing
VAL_FRACTION = 0.05  # sample_instruct only (no validation file): the tail that becomes the val split
INSTRUCT_FIELDS = ("Summary", "Story", "Features", "Words", "Random sentence")
FIELD_RE = re.compile(r"^(" + "|".join(INSTRUCT_FIELDS) + r"):[ \t]*", re.M)

# dataset -> (hub repo, train file, val file, instruct?); "sample*" read the bundled real text instead.
DATASETS = {
    "tinystories": ("roneneldan/TinyStories", "TinyStories-train.txt", "TinyStories-valid.txt", False),
    "tinystories_instruct": ("roneneldan/TinyStoriesInstruct", "TinyStoriesInstruct-train.txt",
                             "TinyStoriesInstruct-valid.txt", True),
    "sample": (None, "stories.txt", "valid.txt", False),
    "sample_instruct": (None, "instruct.txt", None, True),
}
# The seed write-up's token counts (its table "Total Tokens / Num. Entries"), to compare a full run with.
SEED_COUNTS = {
    ("tinystories", "train"): (494_907_437, 2_119_719),
    ("tinystories", "val"): (4_978_396, 21_990),
    ("tinystories_instruct", "train"): (684_805_492, 2_476_533),
    ("tinystories_instruct", "val"): (6_903_020, 25_027),
}
SPLITS = ("train", "val")


# ----------------------------------------------------------------------------------------------------
# Readers


class Documents(Sequence):
    """Documents of one split: docs[i] -> np.uint16 array (no eos), sliced from a memory-mapped .bin."""

    def __init__(self, bin_path: str, idx_path: str):
        self.bin_path, self.idx_path = bin_path, idx_path
        size = os.path.getsize(bin_path)
        if size == 0 or size % 2:  # numpy's own errors name neither the file nor the fix
            raise ValueError(f"{bin_path} is {size} bytes, not a whole number of uint16 tokens (> 0): it was cut "
                             "short or overwritten; run prepare.py again")
        try:
            self.offsets = np.load(idx_path, allow_pickle=False)  # (n_docs + 1,) int64: 17 MB for all of TinyStories
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{idx_path} is not a readable index ({type(e).__name__}): it was cut short or replaced; "
                             "run prepare.py again") from None
        self.tokens = np.memmap(bin_path, dtype=np.uint16, mode="r")  # (n_tokens + n_docs,)
        if self.offsets.dtype.kind not in "iu" or self.offsets.ndim != 1 or len(self.offsets) < 2 or self.offsets[0] != 0 \
                or self.offsets[-1] != len(self.tokens) or np.any(np.diff(self.offsets) < 1):
            raise ValueError(f"{bin_path} ({len(self.tokens)} tokens) does not match its index {idx_path} "
                             f"(ends at {self.offsets[-1] if len(self.offsets) else None}): "
                             "the files are from different runs or truncated; run prepare.py again")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        i = int(i) % n
        # a read-only view into the memmap (no copy); np.asarray drops the memmap subclass
        return np.asarray(self.tokens[self.offsets[i]: self.offsets[i + 1] - 1])  # drop the eos

    @property
    def lengths(self) -> np.ndarray:
        """(n_docs,) int64 token count of every document, without its eos."""
        return np.diff(self.offsets) - 1

    # A memmap pickles as a full in-memory copy; DataLoader workers should re-open the files instead.
    def __getstate__(self) -> dict:
        return {"bin_path": self.bin_path, "idx_path": self.idx_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["bin_path"], state["idx_path"])


class Pairs(Sequence):
    """Fine-tuning pairs of one split: pairs[i] -> (story ids, summary ids), np.uint16, no eos."""

    def __init__(self, stories: Documents, summaries: Documents):
        if len(stories) != len(summaries):
            raise ValueError(f"{stories.bin_path} has {len(stories)} stories but {summaries.bin_path} has "
                             f"{len(summaries)} summaries: run prepare.py again")
        self.stories, self.summaries = stories, summaries

    def __len__(self) -> int:
        return len(self.stories)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.stories[i], self.summaries[i]


def _run_hint(data_dir: str) -> str:
    """The command that (re)builds data_dir: a preset's, or the one its meta.json recorded (prepare_corpus)."""
    name = os.path.basename(os.path.normpath(data_dir))
    if name in DATASETS:
        return f"python prepare.py {name}"
    try:
        with open(os.path.join(data_dir, "meta.json"), encoding="utf-8") as f:
            command = json.load(f).get("command")
    except (OSError, ValueError, AttributeError):
        command = None
    return command if isinstance(command, str) else f"python prepare.py DATASET --out-dir {data_dir}"


def load_meta(data_dir: str) -> dict:
    """meta.json of a prepared directory (see the module docstring), or one clear line if there is none."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise ValueError(f"{data_dir} has no meta.json (not prepared, or preparation did not finish): "
                         f"run `{_run_hint(data_dir)}` first")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors; a directory...)
        raise ValueError(f"{path} is not valid JSON ({first_line(e)}): run `{_run_hint(data_dir)}` again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a JSON {json_type(meta)}, not the object prepare.py writes: "
                         f"run `{_run_hint(data_dir)}` again")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is format {meta.get('format')}, this prepare.py reads format {FORMAT}: "
                         f"run `{_run_hint(data_dir)}` again")
    _check_meta(meta, path, f"run `{_run_hint(data_dir)}` again")
    return meta


# What readers use of meta.json, with the JSON type each must have: an edited or cut meta.json is one line naming
# the key, not a KeyError or AttributeError wherever the key is first used. The readers index META_KEYS; the
# OPTIONAL_KEYS they compare or report only when present (prepare() writes them all).
META_KEYS = {"tokenizer": str, "eos_id": int, "pad_id": int, "splits": dict}
OPTIONAL_KEYS = {"dataset": str, "tokenizer_sha256": str, "vocab_size": int, "base_vocab_size": int, "mode_ids": dict,
                 "sentinel_ids": list, "instruct": bool, "sources": list, "shard_sha256": dict}
SPLIT_KEYS = {"documents": int, "tokens": int}
PAIR_KEYS = {"pairs": int, "story_tokens": int, "summary_tokens": int}
SOURCE_KEYS = {"split": str}  # the rest of a source (a file and its sha256, or a hub split) is compared whole


def _check_meta(meta: dict, path: str, fix: str) -> None:
    def check(obj, keys: dict, where: str, optional: bool = False) -> None:
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: {where.rstrip('.')} is a JSON {json_type(obj)}, not an object: the file was "
                             f"edited or damaged; {fix}")
        for key, kind in keys.items():
            if optional and key not in obj:
                continue
            value = obj.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                got = "it is missing" if key not in obj else f"it is {value!r}"
                raise ValueError(f"{path}: {where}{key} must be a JSON {json_type(kind())} ({got}): the file was "
                                 f"edited or damaged; {fix}")

    check(meta, META_KEYS, "")
    check(meta, OPTIONAL_KEYS, "", optional=True)
    for split, counts in meta["splits"].items():
        check(counts, SPLIT_KEYS, f"splits.{split}.")
        if "pairs" in counts:
            check(counts["pairs"], PAIR_KEYS, f"splits.{split}.pairs.")
    for i, source in enumerate(meta.get("sources", [])):
        check(source, SOURCE_KEYS, f"sources[{i}].")


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    return {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}[type(value)]


def split_counts(data_dir: str, split: str) -> dict:
    """meta.json's counts of one split (documents, tokens, ...), or one line if there is no such split."""
    return _split_meta(data_dir, split)[1]


def _split_meta(data_dir: str, split: str) -> tuple[dict, dict]:
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        raise ValueError(f"{data_dir} has no {split} split (no meta.json: not prepared, or preparation did not "
                         f"finish): run `{_run_hint(data_dir)}` first")
    meta = load_meta(data_dir)
    if split not in meta["splits"]:
        raise ValueError(f"{data_dir} has no {split} split (it has {', '.join(meta['splits']) or 'none'}): "
                         f"run `{_run_hint(data_dir)}` first")
    return meta, meta["splits"][split]


def _open(data_dir: str, stem: str, n_docs: int, n_tokens: int, meta: dict) -> Documents:
    """data_dir/stem.bin + .idx.npy, checked against meta.json before any step uses them (_verify)."""
    bin_path, idx_path = os.path.join(data_dir, stem + ".bin"), os.path.join(data_dir, stem + ".idx.npy")
    for p in (bin_path, idx_path):
        if not os.path.exists(p):
            raise ValueError(f"{p} is missing although meta.json lists it: run `{_run_hint(data_dir)}` again")
    try:
        docs = Documents(bin_path, idx_path)
    except ValueError as e:  # (Documents alone cannot name the command that rebuilds the directory)
        raise ValueError(str(e).replace("run prepare.py again", f"run `{_run_hint(data_dir)}` again")) from None
    if len(docs) != n_docs or len(docs.tokens) != n_tokens + n_docs:
        raise ValueError(f"{bin_path} has {len(docs)} documents / {len(docs.tokens)} tokens but meta.json says "
                         f"{n_docs} / {n_tokens + n_docs} (with eos): run `{_run_hint(data_dir)}` again")
    _verify(docs, data_dir, meta)
    return docs


SCAN_BLOCK = 1 << 24  # tokens per block of _verify's pass: 32 MB, whatever the shard's size


def _verify(docs: Documents, data_dir: str, meta: dict) -> None:
    """What a damaged shard would otherwise show only hours into a run, or never: one pass over the memmap
    checks that every id is text (below base_vocab_size: the tokenizer's own pieces, before the added pad /
    mode / sentinel ids; a document ends in eos) and that the file still has the sha256 prepare.py recorded (a flipped byte that stays in range). Measured on a shard the
    size of TinyStories-Instruct's train split (688M tokens, real tokens tiled, page cache warm; bench.py g):
    1.65-1.77 s on one core of a busy 2-core EPYC, ~1.0 s of it sha256 (hashlib, SHA-NI) and 0.08 s the id
    scan; a cold cache adds one read of the file, which the id scan needs anyway. That is cheap enough to do in
    full at every start, so train.py and finetune.py never train on a shard that differs from what prepare.py
    wrote; a sampled checksum would miss single flipped bytes."""
    fix = f"run `{_run_hint(data_dir)}` again (it rebuilds damaged files)"
    tokens, h, bad = docs.tokens, hashlib.sha256(), None
    text_ids = meta.get("base_vocab_size", meta["pad_id"])
    for start in range(0, len(tokens), SCAN_BLOCK):
        block = tokens[start:start + SCAN_BLOCK]
        h.update(block)
        if bad is None and int(block.max()) >= text_ids:
            bad = start + int(np.argmax(block >= text_ids))
    if bad is not None:
        pos, doc = bad, int(np.searchsorted(docs.offsets, bad, side="right")) - 1
        raise ValueError(f"{docs.bin_path} holds id {int(tokens[pos])} at token {pos:,} (document {doc:,}), but text ids "
                         f"are below {text_ids} (tokenizer {meta['tokenizer']!r}): the file is damaged; {fix}")
    ends = docs.offsets[1:] - 1
    if np.any(tokens[ends] != meta["eos_id"]):
        doc = int(np.flatnonzero(tokens[ends] != meta["eos_id"])[0])
        raise ValueError(f"document {doc:,} of {docs.bin_path} does not end in eos ({meta['eos_id']}) where "
                         f"{docs.idx_path} says: the two files do not belong together; {fix}")
    recorded = meta.get("shard_sha256", {})
    for path, digest in ((docs.bin_path, h.hexdigest()), (docs.idx_path, None)):
        name = os.path.relpath(path, data_dir)
        if name in recorded and (digest or sha256_file(path)) != recorded[name]:
            raise ValueError(f"{path} has changed since prepare.py wrote it (its sha256 is not the one in "
                             f"{os.path.join(data_dir, 'meta.json')}): the file is damaged; {fix}")


def load_documents(data_dir: str, split: str) -> Documents:
    """All documents (pre-training text) of a split: len(docs), docs[i] -> np.uint16 array without eos."""
    meta, s = _split_meta(data_dir, split)
    return _open(data_dir, split, s["documents"], s["tokens"], meta)


def load_pairs(data_dir: str, split: str) -> Pairs:
    """(story, summary) pairs of an instruct split: pairs[i] -> (np.uint16 story, np.uint16 summary), no eos."""
    meta, s = _split_meta(data_dir, split)
    if "pairs" not in s:
        raise ValueError(f"{data_dir} has no (story, summary) pairs: only instruct datasets do; "
                         "run `python prepare.py sample_instruct` (or tinystories_instruct) and use that directory")
    p = s["pairs"]
    return Pairs(_open(data_dir, f"pairs/{split}_story", p["pairs"], p["story_tokens"], meta),
                 _open(data_dir, f"pairs/{split}_summary", p["pairs"], p["summary_tokens"], meta))


def load_tokenizer(data_dir: str) -> Tokenizer:
    """The tokenizer meta.json names, checked against the one it recorded (check_tokenizer); one line if it
    cannot be loaded here."""
    meta = load_meta(data_dir)
    tok = _load_tokenizer(meta["tokenizer"], f"or tokenize {data_dir} again with one that loads here (its meta.json "
                                             f"names {meta['tokenizer']!r}): `{_run_hint(data_dir)} --tokenizer mistral`")
    check_tokenizer(data_dir, tok)
    return tok


def check_tokenizer(data_dir: str, tok: Tokenizer) -> None:
    """tok must be the tokenizer that made data_dir: the same model file (sha256) and the same special ids, or
    the ids on disk mean other words (or nothing): one line naming what differs."""
    meta = load_meta(data_dir)
    # the kind of tokenizer, not its full name: a T5 name holds where its spiece.model came from (hub id or
    # directory); the model file itself is pinned by its sha256
    here = {"tokenizer": tok.name.split(":")[0], "tokenizer_sha256": tokenizer_sha256(tok), "vocab_size": tok.vocab_size,
            "base_vocab_size": tok.base_vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "mode_ids": tok.mode_ids, "sentinel_ids": [tok.sentinel_ids[0], tok.sentinel_ids[-1]]}
    meta = {**meta, "tokenizer": str(meta.get("tokenizer", "")).split(":")[0]}
    wrong = [k for k, v in here.items() if meta.get(k) != v]
    if wrong:
        k, also = wrong[0], f"; also {', '.join(wrong[1:])}" if wrong[1:] else ""
        raise ValueError(f"{data_dir}/meta.json does not match the {tok.name!r} tokenizer here ({k} {meta.get(k)!r} in "
                         f"meta.json, {here[k]!r} here{also}): the data was tokenized by another tokenizer version, or "
                         f"meta.json was edited; run `{_run_hint(data_dir)}` again")


# ----------------------------------------------------------------------------------------------------
# Reading records


def iter_chunks(path: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
    """Stream bytes [start, stop) of a file as blocks of whole records (each block ends just after an EOT).

    Streaming keeps memory flat for the 2 GB Instruct file; cutting at separators lets workers tokenize
    blocks independently. Raises ValueError for an empty range, a file with no separator at all, or a
    "record" so long that the file cannot be a TinyStories file.
    """
    stop = os.path.getsize(path) if stop is None else stop
    seen_eot, content = False, False
    carry = b""
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < stop:
            block = f.read(min(CHUNK_BYTES, stop - pos))
            if not block:
                break
            pos += len(block)
            buf = carry + block
            cut = buf.rfind(EOT)
            if cut < 0:
                carry = buf
                if len(carry) > MAX_RECORD_BYTES:
                    raise ValueError(f"{path}: record of {len(carry):,}+ bytes without a `<|endoftext|>` separator "
                                     "at its end; is this a TinyStories file? (records are separated by "
                                     "lines `<|endoftext|>`)")
                continue
            seen_eot = True
            cut += len(EOT)
            content = content or not buf[:cut].replace(EOT, b"").isspace()
            carry = buf[cut:]
            yield buf[:cut]
    if carry.strip():  # a last record without a closing separator is still a record
        if not seen_eot:
            raise ValueError(f"{path} has no `<|endoftext|>` separator: is this a TinyStories file? "
                             "(records must be separated by lines `<|endoftext|>`)")
        content = True
        yield carry
    if not content:
        raise ValueError(f"{path} is empty (no text in bytes {start}..{stop}): "
                         "pass a TinyStories .txt file with records separated by `<|endoftext|>` lines")


def split_offset(path: str, val_fraction: float) -> int:
    """Byte offset where the last val_fraction of a file's records (at least 1) start. Streams, like iter_chunks.

    Records are the separator-delimited parts, counted in a first pass; the boundary is found by re-reading
    only the block that holds it.
    """
    counts: list[tuple[int, int]] = []  # (block start, records ending in the block)
    pos = 0
    for chunk in iter_chunks(path):
        counts.append((pos, chunk.count(EOT) + (not chunk.endswith(EOT))))
        pos += len(chunk)
    n_records = sum(c for _, c in counts)
    if n_records < 2:
        raise ValueError(f"{path} has {n_records} record: a train and a val split need at least 2")
    k = n_records - max(1, round(val_fraction * n_records))  # records that stay in train
    for block_start, c in counts:
        if k <= c:  # the boundary is just after the k-th separator of this block
            with open(path, "rb") as f:
                f.seek(block_start)
                block = f.read(CHUNK_BYTES + MAX_RECORD_BYTES)  # a block is at most one read + the carry
            at = -len(EOT)
            for _ in range(k):
                at = block.index(EOT, at + len(EOT))
            return block_start + at + len(EOT)
        k -= c
    raise AssertionError("unreachable: k < n_records")


def parse_instruct(record: str) -> dict[str, str]:
    """'Summary: ...\\nStory: \\n\\n...' -> {"Summary": "...", "Story": "..."}; fields in any order, values stripped."""
    parts = FIELD_RE.split(record)  # [text before the first field, name, value, name, value, ...]
    return {name: value.strip() for name, value in zip(parts[1::2], parts[2::2])}


# ----------------------------------------------------------------------------------------------------
# Tokenizing


class Chunk(NamedTuple):
    """One tokenized block of records. tokens holds every document followed by eos (file order)."""
    n_bytes: int            # raw bytes consumed (progress bar)
    tokens: np.ndarray      # (sum(lengths) + len(lengths),) uint16
    lengths: np.ndarray     # (n_docs,) int64, without eos
    skipped: int            # empty records
    bad_bytes: int          # bytes that were not UTF-8 (decoded as U+FFFD)
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None  # story tokens, lengths, summary tokens, lengths
    pairs_skipped: int      # instruct records without a Story or a Summary


_bad_bytes = [0]


def _replace_counting(err: UnicodeDecodeError) -> tuple[str, int]:
    _bad_bytes[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("prepare_count", _replace_counting)


def _pack(seqs: list[list[int]], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[[ids], ...] -> (uint16 [ids, eos, ids, eos, ...], int64 lengths without eos)."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    n = int(lengths.sum())
    out = np.full(n + len(seqs), eos_id, dtype=np.uint16)
    is_text = np.ones(len(out), dtype=bool)
    is_text[np.cumsum(lengths + 1) - 1] = False  # the eos slots
    # one C-level pass over all ids: ~20 ns/token, vs ~400 ns/token for SentencePiece itself
    out[is_text] = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.uint16, count=n)
    return out, lengths


def tokenize_chunk(chunk: bytes, tok: Tokenizer, instruct: bool = False) -> Chunk:
    """Tokenize a block of whole records (from iter_chunks) in one batched encode call."""
    _bad_bytes[0] = 0
    text = chunk.decode("utf-8", errors="prepare_count")  # valid UTF-8 (nearly always) takes the C fast path
    bad = _bad_bytes[0]
    records = [r.strip() for r in text.split(EOT.decode())]
    docs = [r for r in records if r]
    skipped = len(records) - len(docs) - (chunk.rstrip().endswith(EOT))  # the split after the last EOT is no record
    too_long = next((d for d in docs if len(d) > MAX_RECORD_BYTES), None)
    if too_long is not None:
        raise ValueError(f"record of {len(too_long.encode()):,} bytes (starts {too_long[:40]!r}); "
                         "is this a TinyStories file? (records are separated by lines `<|endoftext|>`)")
    return _encode(docs, len(chunk), skipped, bad, tok, instruct)


def tokenize_records(records: list[str | bytes | None], tok: Tokenizer) -> Chunk:
    """Tokenize a block of documents a corpus reader split apart (read_corpus): str, bytes (decoded here, bytes
    that are not UTF-8 counted as for TinyStories files) or None (a missing value). Each is stripped; empty
    ones are skipped and counted."""
    _bad_bytes[0] = 0
    texts = [r.decode("utf-8", errors="prepare_count") if isinstance(r, bytes) else r or "" for r in records]
    docs = [t for t in (t.strip() for t in texts) if t]
    return _encode(docs, sum(map(len, texts)), len(texts) - len(docs), _bad_bytes[0], tok, False)


def _encode(docs: list[str], n_bytes: int, skipped: int, bad: int, tok: Tokenizer, instruct: bool) -> Chunk:
    pairs, pairs_skipped, texts = None, 0, docs
    if instruct:
        fields = [parse_instruct(d) for d in docs]
        keep = [f for f in fields if f.get("Story") and f.get("Summary")]
        pairs_skipped = len(fields) - len(keep)
        texts = docs + [f["Story"] for f in keep] + [f["Summary"] for f in keep]
    ids = tok.encode(texts) if texts else []  # one batched call: the fast path of SentencePiece
    tokens, lengths = _pack(ids[:len(docs)], tok.eos_id)
    if instruct:
        n = (len(ids) - len(docs)) // 2
        pairs = (*_pack(ids[len(docs):len(docs) + n], tok.eos_id), *_pack(ids[len(docs) + n:], tok.eos_id))
    return Chunk(n_bytes, tokens, lengths, skipped, bad, pairs, pairs_skipped)


def tokenize_block(block: bytes | list, tok: Tokenizer, instruct: bool) -> Chunk:
    """A block of tokenize_in_order: bytes of whole records (iter_chunks) or a list of documents (read_corpus)."""
    return tokenize_chunk(block, tok, instruct) if isinstance(block, bytes) else tokenize_records(block, tok)


_worker_tok: Tokenizer | None = None


def _work(chunk: bytes | list, instruct: bool, tokenizer_name: str) -> Chunk:
    global _worker_tok
    if _worker_tok is None:  # once per worker process, not once per chunk
        _worker_tok = get_tokenizer(tokenizer_name)
    return tokenize_block(chunk, _worker_tok, instruct)


def _quiet_worker() -> None:
    """Ctrl-C reaches the workers too (the terminal signals the whole process group): the parent handles it and
    shuts them down, so a worker ignores it rather than print a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tokenize_file(path: str, tok: Tokenizer, workers: int = 1, instruct: bool = False,
                  start: int = 0, stop: int | None = None) -> Iterator[Chunk]:
    """Tokenized Chunks of bytes [start, stop) of a file, in file order. This is what bench.py times:
        n_tokens = sum(len(c.tokens) for c in tokenize_file(path, tok, workers))   # includes one eos per doc
    workers > 1 tokenizes in worker processes (tok must come from get_tokenizer: workers rebuild it by name).
    """
    for _, chunk in tokenize_in_order(((None, c) for c in iter_chunks(path, start, stop)), tok, workers, instruct):
        yield chunk


def tokenize_in_order(items: Iterator[tuple[object, bytes | list]], tok: Tokenizer, workers: int = 1,
                      instruct: bool = False) -> Iterator[tuple[object, Chunk]]:
    """(tag, Chunk) for each (tag, block) in order: a block is bytes of whole <|endoftext|> records (iter_chunks)
    or a list of documents (read_corpus); the tag rides along in this process (the split a block goes to)."""
    if workers <= 1:
        for tag, c in items:
            yield tag, tokenize_block(c, tok, instruct)
        return
    # The workers start from a fork server (a fresh interpreter), not as forks of this process, which may hold threads
    # (torch's, a tracker's) whose locks a forked copy would inherit mid-operation. A worker's exception reaches the
    # caller, and a worker that dies (killed for memory) is BrokenProcessPool, where multiprocessing.Pool waits
    # forever for both. (Not always: on CPython 3.11 the executor hung once here with both workers killed while
    # 1 MB blocks were queued for them, as in python/cpython#94777.)
    if "forkserver" in mp.get_all_start_methods():
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(["__main__", __name__])  # the server imports this module once, not each worker
    else:  # Windows
        context = mp.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_quiet_worker)
    # A bounded window of tasks keeps memory flat and the results in file order (map() would read the whole file
    # ahead), while 2 tasks per worker keep every core busy.
    pending: deque = deque()
    try:
        for tag, c in items:
            pending.append((tag, pool.submit(_work, c, instruct, tok.name)))
            if len(pending) >= 2 * workers:
                tag, result = pending.popleft()
                yield tag, result.result()
        while pending:
            tag, result = pending.popleft()
            yield tag, result.result()
    except BrokenProcessPool:
        raise SystemExit(f"a tokenizing worker process died (its error is above; with none, it was killed, most likely "
                         f"for lack of memory): run again with --workers 1, or fewer than {workers}") from None
    finally:  # also when the caller stops early: queued blocks are dropped, not tokenized
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------
# Writing


def shard_files(instruct: bool) -> list[str]:
    """The files a prepared directory holds besides meta.json, relative to it (the module docstring)."""
    stems = [*SPLITS, *(f"pairs/{split}_{part}" for split in SPLITS for part in ("story", "summary") if instruct)]
    return [stem + ext for stem in stems for ext in (".bin", ".idx.npy")]


def _retry_note(out_dir: str) -> str:
    """For a write that failed for lack of space: what is left, and how to go on."""
    return (f"{out_dir} has no meta.json until a run finishes (readers refuse it): free some space, then run "
            f"`{_run_hint(out_dir)}` again")


def _write_index(path: str, lengths: list[np.ndarray], out_dir: str) -> None:
    offsets = np.zeros(sum(map(len, lengths)) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths) + 1, out=offsets[1:])
    with atomic_write(path, needed=offsets.nbytes, then=_retry_note(out_dir)) as f:
        np.save(f, offsets)


class SplitWriter:
    """One split's shards, filled chunk by chunk: {split}.bin (and pairs/ for instruct data) through atomic_write
    inside `stack`, so an error anywhere before the stack closes leaves no file behind; write_index() after it
    closed. counts: documents, tokens, skipped (empty records), bad_bytes (and pairs)."""

    def __init__(self, out_dir: str, split: str, instruct: bool, stack: ExitStack):
        self.out_dir, self.split, self.instruct = out_dir, split, instruct
        self.counts = {"documents": 0, "tokens": 0, "skipped": 0, "bad_bytes": 0}
        self.pairs = {"pairs": 0, "story_tokens": 0, "summary_tokens": 0, "skipped": 0}
        self.lengths: list[np.ndarray] = []
        self.pair_lengths: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        self.pairs_dir = os.path.join(out_dir, "pairs")
        then = _retry_note(out_dir)
        self.f = stack.enter_context(atomic_write(os.path.join(out_dir, f"{split}.bin"), then=then))
        if instruct:
            os.makedirs(self.pairs_dir, exist_ok=True)
            self.fs = stack.enter_context(atomic_write(os.path.join(self.pairs_dir, f"{split}_story.bin"), then=then))
            self.fm = stack.enter_context(atomic_write(os.path.join(self.pairs_dir, f"{split}_summary.bin"), then=then))

    def add(self, c: Chunk) -> None:
        self.f.write(c.tokens.tobytes())
        self.lengths.append(c.lengths)
        self.counts["documents"] += len(c.lengths)
        self.counts["tokens"] += int(c.lengths.sum())
        self.counts["skipped"] += c.skipped
        self.counts["bad_bytes"] += c.bad_bytes
        if self.instruct:
            st, sl, mt, ml = c.pairs
            self.fs.write(st.tobytes())
            self.fm.write(mt.tobytes())
            self.pair_lengths[0].append(sl)
            self.pair_lengths[1].append(ml)
            self.pairs["pairs"] += len(sl)
            self.pairs["story_tokens"] += int(sl.sum())
            self.pairs["summary_tokens"] += int(ml.sum())
            self.pairs["skipped"] += c.pairs_skipped

    def check(self, source: str) -> None:
        """Raise (inside the stack: no file is kept) if `source` gave this split nothing to write."""
        if self.counts["documents"] == 0:
            raise ValueError(f"{source} has no non-empty record: nothing to write for {self.split}")
        if self.instruct and self.pairs["pairs"] == 0:
            raise ValueError(f"{source}: none of its {self.counts['documents']} records has both a Story: and a "
                             "Summary: field; is this a TinyStories-Instruct file?")

    def write_index(self) -> dict:
        """The index files (after the shards were committed); returns the split's counts for meta.json."""
        _write_index(os.path.join(self.out_dir, f"{self.split}.idx.npy"), self.lengths, self.out_dir)
        if not self.instruct:
            return dict(self.counts)
        _write_index(os.path.join(self.pairs_dir, f"{self.split}_story.idx.npy"), self.pair_lengths[0], self.out_dir)
        _write_index(os.path.join(self.pairs_dir, f"{self.split}_summary.idx.npy"), self.pair_lengths[1], self.out_dir)
        return {**self.counts, "pairs": dict(self.pairs)}


def write_split(out_dir: str, split: str, path: str, tok: Tokenizer, workers: int, instruct: bool,
                start: int = 0, stop: int | None = None, desc: str = "") -> dict:
    """Tokenize one split of one source file into out_dir/{split}.bin + .idx.npy (and pairs/). Returns its counts."""
    from tqdm import tqdm

    stop = os.path.getsize(path) if stop is None else stop
    with ExitStack() as stack:
        writer = SplitWriter(out_dir, split, instruct, stack)
        with tqdm(total=stop - start, unit="B", unit_scale=True, desc=desc or split, disable=None) as bar:
            for c in tokenize_file(path, tok, workers, instruct, start, stop):
                writer.add(c)
                bar.update(c.n_bytes)
        writer.check(f"{path} (bytes {start}..{stop})")  # raising here discards the temp files: no empty split on disk
    return writer.write_index()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def tokenizer_sha256(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's model file (for tiktoken: of its token byte table), so a changed model rebuilds."""
    if os.path.isfile(tok.model_file):
        return sha256_file(tok.model_file)
    return hashlib.sha256(b"\0".join(tok._bpe.token_byte_values())).hexdigest()


def download(repo: str, filename: str) -> str:
    """Path of a hub file in the local Hugging Face cache (downloaded, or resumed, on first use)."""
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset")
    except Exception as e:  # noqa: BLE001 - every hub failure (offline, DNS, 404, auth) gets the same fix
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise SystemExit(f"could not download {repo}/{filename} ({type(e).__name__}: {first}); use local files: "
                         f"`python prepare.py DATASET --train FILE --val FILE`, or the bundled sample: "
                         f"`python prepare.py sample`") from None


def resolve_sources(dataset: str, train: str | None, val: str | None) -> tuple[list[dict], bool]:
    """[{split, path, start, stop}, ...] and whether the records are Instruct records."""
    repo, train_name, val_name, instruct = DATASETS[dataset]
    if repo is None:
        if train or val:
            raise ValueError(f"{dataset} always reads the bundled files in data/sample/: "
                             "use --train/--val with tinystories or tinystories_instruct")
        paths = [os.path.join(SAMPLE_DIR, name) for name in (train_name, val_name) if name]
        for path in paths:
            if not os.path.exists(path):
                raise ValueError(f"{path} is missing: the bundled sample is part of the repository; restore it with git")
        if val_name:  # a genuine validation file
            return [{"split": split, "path": path, "start": 0, "stop": os.path.getsize(path)}
                    for split, path in zip(SPLITS, paths)], instruct
        path = paths[0]
        boundary = split_offset(path, VAL_FRACTION)
        return [{"split": "train", "path": path, "start": 0, "stop": boundary},
                {"split": "val", "path": path, "start": boundary, "stop": os.path.getsize(path)}], instruct
    if bool(train) != bool(val):
        raise ValueError("give both --train FILE and --val FILE (or neither, to download from the hub)")
    if not train:
        train, val = download(repo, train_name), download(repo, val_name)
    for p in (train, val):
        if not os.path.isfile(p):
            raise ValueError(f"{p} {'is a directory' if os.path.isdir(p) else 'does not exist'}: pass the path of a "
                             "TinyStories .txt file")
    return [{"split": "train", "path": os.path.abspath(train), "start": 0, "stop": os.path.getsize(train)},
            {"split": "val", "path": os.path.abspath(val), "start": 0, "stop": os.path.getsize(val)}], instruct


def prepare(dataset: str, out_dir: str | None = None, train: str | None = None, val: str | None = None,
            workers: int | None = None, tokenizer: str | Tokenizer = "mistral") -> dict:
    """Build data/<dataset>/ (see the module docstring); returns its meta. A no-op if it is up to date.
    workers > 1 (the default: all cores) starts worker processes, which import the calling script as Python's
    multiprocessing does: a script that calls this keeps its own work under `if __name__ == "__main__":`."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    out_dir = out_dir or os.path.join(HERE, "data", dataset)
    workers = workers or default_workers()
    tok = _checked_tokenizer(tokenizer)
    sources, instruct = resolve_sources(dataset, train, val)
    for s in sources:
        s["sha256"] = sha256_file(s["path"])  # of the whole file: sample_instruct's two splits share one

    def write() -> dict:
        counts = {}
        # the small val split first: a malformed --val file fails in seconds, not after the train file's minutes
        for s in sorted(sources, key=lambda s: s["split"] != "val"):
            counts[s["split"]] = write_split(out_dir, s["split"], s["path"], tok, workers, instruct,
                                             s["start"], s["stop"], desc=f"{dataset} {s['split']}")
        return counts

    reference = dataset if (dataset, "train") in SEED_COUNTS else None
    return build(out_dir, new_meta(dataset, tok, instruct, sources, reference), write)


def _checked_tokenizer(tokenizer: str | Tokenizer) -> Tokenizer:
    tok = _load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if tok.vocab_size > 1 << 16:  # before any work: uint16 shards would silently wrap larger ids
        raise ValueError(f"tokenizer {tok.name!r} has {tok.vocab_size:,} ids but shards store uint16 "
                         f"(at most 65,536 ids): use a smaller vocabulary")
    return tok


def new_meta(dataset: str, tok: Tokenizer, instruct: bool, sources: list[dict], reference: str | None,
             command: str | None = None) -> dict:
    """meta.json before the splits are written. dataset: the name in the token table; reference: the preset
    whose write-up counts the table prints beside ours (None: no comparison); command: how to rebuild it."""
    meta = {
        "format": FORMAT, "dataset": dataset, "tokenizer": tok.name, "tokenizer_sha256": tokenizer_sha256(tok),
        "vocab_size": tok.vocab_size, "base_vocab_size": tok.base_vocab_size, "eos_id": tok.eos_id,
        "pad_id": tok.pad_id, "mode_ids": tok.mode_ids, "sentinel_ids": [tok.sentinel_ids[0], tok.sentinel_ids[-1]],
        "dtype": "uint16", "instruct": instruct, "sources": sources, "reference": reference,
    }
    return {**meta, "command": command} if command else meta


def build(out_dir: str, meta: dict, write: Callable[[], dict]) -> dict:
    """Everything around write() (which writes the shards and returns {split: counts}): the temp files of a
    killed run removed, the up-to-date check, meta.json removed first and written last, the token table."""
    # a prepare.py killed mid-write left its temp files: this one owns the directory now
    shards = shard_files(meta["instruct"])
    for directory in sorted({os.path.dirname(os.path.join(out_dir, name)) for name in shards}):
        if os.path.isdir(directory):
            remove_stale_temps(directory, [os.path.basename(n) for n in shards] + ["meta.json"])
    if _up_to_date(out_dir, meta):
        print(f"{out_dir} is up to date (same sources and tokenizer); delete its meta.json to rebuild")
        return load_meta(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.unlink(meta_path)  # the old meta must not describe the half-written new shards
    counts = write()
    meta["splits"] = {split: counts[split] for split in SPLITS}
    # one more read of every shard (from the page cache): readers verify damage against these (_verify)
    meta["shard_sha256"] = {name: sha256_file(os.path.join(out_dir, name)) for name in shards}
    with atomic_write(meta_path, "w", then=_retry_note(out_dir)) as f:
        json.dump(meta, f, indent=1)
    print_table(meta)
    return meta


# ----------------------------------------------------------------------------------------------------
# Any corpus: plain text, JSON Lines, Parquet, a Hugging Face dataset (prepare.py text|jsonl|parquet|hf:NAME)

FORMATS = ("text", "jsonl", "parquet")  # each followed by its files; hf:NAME names a hub dataset instead
# How `prepare.py text` cuts a file into documents (--sample-by; "line" and "paragraph" as HF's text loader).
SAMPLE_BY = {
    "line": re.compile(rb"\n"),                          # one document per line (the default)
    "paragraph": re.compile(rb"\n(?:[ \t\r\f\v]*\n)+"),  # separated by one or more blank lines
    "eot": re.compile(re.escape(EOT)),                   # separated by <|endoftext|>, as the TinyStories files
    "document": None,                                    # each file is one document
}
SEPARATOR_NAMES = {"line": "line break", "paragraph": "blank line", "eot": "`<|endoftext|>`"}
HELD_OUT = 0.01         # --val-fraction when no validation data is given
PARQUET_ROWS = 1024     # rows per Parquet read: a few hundred kB of text for story-sized documents


class Stream(NamedTuple):
    """Documents on their way to a split, as blocks ([document, ...], progress units)."""
    split: str | None        # "train" or "val"; None: each document goes to val with probability val_fraction
    blocks: Iterator[tuple[list, int]]
    total: int | None        # progress units in all (bytes of files, or records), if known
    unit: str
    where: str               # the source, for messages


def _optional(module: str, what: str, package: str):
    """An optional dependency, or one line that names the pip install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{what} needs the {package} package: pip install {package}") from None


def text_blocks(path: str, sample_by: str) -> Iterator[tuple[list[bytes], int]]:
    """([document bytes, ...], bytes read) of a text file cut into documents as SAMPLE_BY[sample_by] says,
    streamed CHUNK_BYTES at a time (the tokenizing workers decode the bytes: tokenize_records)."""
    separator = SAMPLE_BY[sample_by]
    with open(path, "rb") as f:
        if separator is None:
            yield [f.read()], os.path.getsize(path)
            return
        carry = b""
        while block := f.read(CHUNK_BYTES):
            parts = separator.split(carry + block)
            carry = parts.pop()  # the read may have cut the last document: the next block completes it
            long = next((p for p in (*parts, carry) if len(p) > MAX_RECORD_BYTES), None)
            if long is not None:
                other = ", ".join(k for k in SAMPLE_BY if k != sample_by)
                raise ValueError(f"{path}: over {MAX_RECORD_BYTES:,} bytes without a {SEPARATOR_NAMES[sample_by]} "
                                 f"(--sample-by {sample_by}): is it cut into documents another way? use --sample-by "
                                 f"with one of {other}")
            yield parts, len(block)
    if carry.strip():  # a last document without a separator after it
        yield [carry], 0


def _field(record, field: str, where: str) -> str | None:
    """record[field] of a JSON object or a hub dataset's row: its text, or None (a missing value, skipped)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object: JSON Lines holds one object "
                         "per line")
    if field not in record:
        raise ValueError(f"{where} has no field {field!r} (it has {', '.join(map(repr, list(record)[:12]))}): "
                         "name the one that holds the text with --text-field")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} holds {type(value).__name__} data, not text: name the field that "
                         "holds the text with --text-field")
    return value


def jsonl_blocks(path: str, field: str) -> Iterator[tuple[list[str | None], int]]:
    """(texts, bytes read) of a JSON Lines file (UTF-8, one object per line; blank lines are no records)."""
    number = 0
    for lines, n_bytes in text_blocks(path, "line"):
        texts = []
        for line in lines:
            number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # (UnicodeDecodeError is a ValueError: JSON is UTF-8)
                raise ValueError(f"{path} line {number} is not JSON ({str(e)[:120]}): JSON Lines holds one object "
                                 "per line") from None
            texts.append(_field(record, field, f"{path} line {number}"))
        yield texts, n_bytes


def _parquet(path: str, field: str):
    """A pyarrow ParquetFile whose column `field` holds text; one line otherwise."""
    pq = _optional("pyarrow.parquet", "reading Parquet", "pyarrow")
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a file that is not Parquet vary by version
        raise ValueError(f"{path} is not a readable Parquet file ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:120]})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise ValueError(f"{path} has no column {field!r} (it has {', '.join(map(repr, schema.names[:12]))}): name "
                         "the one that holds the text with --text-field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise ValueError(f"{path}: column {field!r} is {kind}, not text: name the column that holds the text with "
                         "--text-field")
    return pf


def parquet_blocks(path: str, field: str) -> Iterator[tuple[list[str | None], int]]:
    """(texts, rows) of one column of a Parquet file, PARQUET_ROWS rows at a time (a null is a missing text)."""
    for batch in _parquet(path, field).iter_batches(batch_size=PARQUET_ROWS, columns=[field]):
        yield batch.column(0).to_pylist(), batch.num_rows


def hf_splits(name: str, config: str | None) -> dict:
    """{split name: records} of a Hugging Face hub dataset, streamed (datasets.load_dataset(streaming=True)):
    records are downloaded as they are read, so a corpus of any size never has to fit on disk or in memory.
    The datasets library caches, resumes and honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE by itself."""
    datasets = _optional("datasets", f"prepare.py hf:{name}", "datasets")
    try:
        return dict(datasets.load_dataset(name, config, streaming=True))
    except Exception as e:  # noqa: BLE001 - offline, DNS, 404, auth, a missing config: one line, the same fixes
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"could not open hf:{name}{f' ({config})' if config else ''} on the Hugging Face hub "
                         f"({type(e).__name__}: {first}); check the name (and --hf-config), or download its files "
                         "and run `python prepare.py jsonl|parquet|text FILE ...`") from None


def hf_blocks(records, field: str, where: str) -> Iterator[tuple[list[str | None], int]]:
    """(texts, records read) of a hub dataset's split, about CHUNK_BYTES of text at a time."""
    texts, size, n = [], 0, 0
    it = iter(records)
    while True:
        try:
            record = next(it)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - the connection dropped mid-stream, ...: nothing is kept
            raise ValueError(f"reading {where} failed after {n:,} records ({type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0][:120]}): run prepare.py again") from None
        n += 1
        texts.append(_field(record, field, f"{where} record {n:,}"))
        size += len(texts[-1] or "")
        if size >= CHUNK_BYTES:
            yield texts, len(texts)
            texts, size = [], 0
    if texts:
        yield texts, len(texts)


def _hf_rows(records, split: str) -> int | None:
    """The number of records of a hub split, where the dataset's card says (for the progress bar)."""
    try:
        return int(records.info.splits[split].num_examples) or None
    except Exception:  # noqa: BLE001 - no info, no split info, no count: the bar counts without a total
        return None


def file_stream(kind: str, split: str | None, paths: list[str], text_field: str, sample_by: str) -> Stream:
    """The documents of local files of one format, in the order given."""
    where = paths[0] + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else "")
    if kind == "parquet":
        total = sum(_parquet(p, text_field).metadata.num_rows for p in paths)  # (checks every file first)
        blocks = (b for p in paths for b in parquet_blocks(p, text_field))
        return Stream(split, blocks, total, "records", where)
    read = (lambda p: jsonl_blocks(p, text_field)) if kind == "jsonl" else (lambda p: text_blocks(p, sample_by))
    return Stream(split, (b for p in paths for b in read(p)), sum(map(os.path.getsize, paths)), "B", where)


def write_corpus(out_dir: str, streams: list[Stream], tok: Tokenizer, workers: int, val_fraction: float,
                 seed: int) -> dict:
    """Tokenize the streams, in order, into out_dir's train and val shards; returns {split: counts}. A stream of
    no split sends each document to val with probability val_fraction: one draw per document (empty ones too)
    from a generator seeded with `seed`, so the split depends on the documents' order and the seed alone."""
    from tqdm import tqdm

    draws = np.random.default_rng(seed)

    def routed(s: Stream) -> Iterator[tuple[tuple[str, int], list]]:
        for records, n in s.blocks:
            if s.split:
                yield (s.split, n), records
                continue
            to_val = draws.random(len(records)) < val_fraction
            held = [r for r, v in zip(records, to_val) if v]
            if held:
                yield ("val", 0), held
            yield ("train", n), [r for r, v in zip(records, to_val) if not v]

    with ExitStack() as stack:  # an error anywhere removes every shard written so far
        writers = {split: SplitWriter(out_dir, split, False, stack) for split in SPLITS}
        for s in streams:
            desc = f"{os.path.basename(out_dir)} {s.split or 'train+val'}"
            with tqdm(total=s.total, unit=s.unit, unit_scale=True, desc=desc, disable=None) as bar:
                for (split, n), chunk in tokenize_in_order(routed(s), tok, workers):
                    writers[split].add(chunk)
                    bar.update(n)
            if s.split:  # (a given val split is written first: a malformed one fails before the train data)
                writers[s.split].check(s.where)
            else:
                writers["train"].check(s.where)
                writers["val"].check(f"the part of {s.where} held out for validation (--val-fraction "
                                     f"{val_fraction:g}, --seed {seed}: raise the fraction, or give validation data)")
    return {split: w.write_index() for split, w in writers.items()}


def prepare_corpus(source: str, files: Sequence[str] = (), out_dir: str | None = None, val: Sequence[str] = (),
                   val_fraction: float | None = None, seed: int = 0, text_field: str = "text",
                   sample_by: str = "line", hf_config: str | None = None, train_split: str = "train",
                   val_split: str | None = None, workers: int | None = None,
                   tokenizer: str | Tokenizer = "mistral") -> dict:
    """Any corpus -> a prepared directory like the presets' (the module docstring; `train.py --dataset=NAME`
    reads data/NAME). source: "text", "jsonl" or "parquet" with `files` (and `val` files), or "hf:NAME" (a hub
    dataset: train_split, and val_split or its "validation" split). Without validation data, val_fraction
    (HELD_OUT by default) of the training documents is held out, drawn with `seed` (write_corpus)."""
    kind = "hf" if source.startswith("hf:") else source
    if kind not in (*FORMATS, "hf"):
        raise ValueError(f"unknown source {source!r}: use {', '.join(FORMATS)} (with files) or hf:NAME")
    if sample_by not in SAMPLE_BY:
        raise ValueError(f"--sample-by {sample_by}: use one of {', '.join(SAMPLE_BY)}")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}: it must be in (0, 1)")
    if val_fraction is not None and (val or val_split):
        raise ValueError("--val-fraction holds validation data out of the training data: give it, or the "
                         "validation data (--val / --val-split), not both")
    hub = source[3:]
    if kind == "hf":
        if files or val:
            raise ValueError(f"{source} is read from the hub: it takes no files (its splits: --train-split, --val-split)")
        if not hub:
            raise ValueError("hf: needs a dataset name, e.g. hf:roneneldan/TinyStories")
    else:
        if not files:
            raise ValueError(f"`prepare.py {kind}` needs the files to read: python prepare.py {kind} FILE [FILE ...]")
        missing = next((p for p in (*files, *val) if not os.path.isfile(p)), None)
        if missing:
            raise ValueError(f"{missing} is not a file")
    name = os.path.splitext(os.path.basename(files[0]))[0] if files else hub.rstrip("/").split("/")[-1]
    out_dir = out_dir or os.path.join(HERE, "data", name)
    workers = workers or default_workers()
    tok = _checked_tokenizer(tokenizer)
    how = {"format": kind, **({"sample_by": sample_by} if kind == "text" else {"text_field": text_field})}

    if kind == "hf":
        splits = hf_splits(hub, hf_config)
        for wanted in (train_split, val_split):
            if wanted is not None and wanted not in splits:
                raise ValueError(f"hf:{hub} has no split {wanted!r} (it has {', '.join(map(repr, splits))}): "
                                 "pick one with --train-split / --val-split")
        if val_split is None and val_fraction is None and "validation" in splits and train_split != "validation":
            val_split = "validation"
        given = [("val", val_split)] if val_split else []
        origin = {"hub": hub, "config": hf_config, **how}
        sources = [{"split": split or "train+val", **origin, "hub_split": hub_split}
                   for split, hub_split in [*given, ("train" if given else None, train_split)]]
        streams = [Stream(split, hf_blocks(splits[hub_split], text_field, f"hf:{hub} split {hub_split}"),
                          _hf_rows(splits[hub_split], hub_split), "records", f"hf:{hub} split {hub_split}")
                   for split, hub_split in [*given, ("train" if given else None, train_split)]]
        reference = "tinystories" if (hub, train_split, val_split, text_field, hf_config) == \
            ("roneneldan/TinyStories", "train", "validation", "text", None) else None
    else:
        groups = [("val", list(val)), ("train", list(files))] if val else [(None, list(files))]
        sources = [{"split": split or "train+val", "path": os.path.abspath(p), "sha256": sha256_file(p), **how}
                   for split, paths in groups for p in paths]
        streams = [file_stream(kind, split, paths, text_field, sample_by) for split, paths in groups]
        reference = None
    held = streams[-1].split is None
    fraction = HELD_OUT if val_fraction is None else val_fraction
    if held:
        for s in sources:
            s.update(val_fraction=fraction, seed=seed)
        print(f"validation: {fraction:g} of the documents held out (--val-fraction, drawn with --seed {seed}); "
              "give validation data instead with " + ("--val-split" if kind == "hf" else "--val FILE"))
    elif kind == "hf":
        print(f"validation: hf:{hub} split {val_split!r}")
    command = _corpus_command(source, files, out_dir, val, val_fraction, seed, text_field, sample_by, hf_config,
                              train_split, val_split, tok.name)
    meta = new_meta(os.path.basename(os.path.normpath(out_dir)), tok, False, sources, reference, command)
    return build(out_dir, meta, lambda: write_corpus(out_dir, streams, tok, workers, fraction, seed))


def _corpus_command(source, files, out_dir, val, val_fraction, seed, text_field, sample_by, hf_config, train_split,
                    val_split, tokenizer) -> str:
    """The prepare.py command line that builds this directory again (for the readers' error messages)."""
    args = ["python", "prepare.py", source, *files, "--out-dir", os.path.relpath(out_dir)]
    args += [a for v in val for a in ("--val", v)]
    for flag, value, default in (("--val-fraction", val_fraction, None), ("--seed", seed, 0),
                                 ("--text-field", text_field, "text"), ("--sample-by", sample_by, "line"),
                                 ("--hf-config", hf_config, None), ("--train-split", train_split, "train"),
                                 ("--tokenizer", tokenizer, "mistral")):
        if value != default and not (flag == "--sample-by" and source != "text") \
                and not (flag == "--text-field" and source == "text"):
            args += [flag, str(value)]
    if val_split and source.startswith("hf:"):
        args += ["--val-split", val_split]
    return shlex.join(args)


def _load_tokenizer(name: str, fix: str = "or use --tokenizer mistral") -> Tokenizer:
    """get_tokenizer(name), or one line that says why it cannot load and (fix) what to do instead."""
    try:
        return get_tokenizer(name)
    except OSError as e:  # tiktoken fetches its BPE file on first use; offline that is a network error
        raise ValueError(f"the {name} tokenizer could not load its vocabulary ({type(e).__name__}): tiktoken "
                         "downloads the GPT-2 BPE file once; run once with network access (or copy a filled "
                         f"TIKTOKEN_CACHE_DIR), {fix}") from None
    except ValueError as e:  # a name that is no tokenizer
        raise ValueError(f"{str(e).splitlines()[0]}; {fix}") from None


def _up_to_date(out_dir: str, meta: dict) -> bool:
    try:
        old = load_meta(out_dir)
    except (ValueError, OSError):
        return False
    try:
        if "shard_sha256" not in old:
            raise ValueError("its meta.json records no shard checksums (an older prepare.py)")
        for split in SPLITS:  # every shard as load_documents checks it: sizes, index, ids, checksum
            load_documents(out_dir, split)
            if meta["instruct"]:
                load_pairs(out_dir, split)
    except (ValueError, OSError, KeyError) as e:
        print(f"rebuilding {out_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return False
    key = ("format", "dataset", "tokenizer", "tokenizer_sha256", "vocab_size")
    # a source is its content (sha256, or a hub dataset's name and split) and how it was read, wherever it lies
    same_sources = [{k: v for k, v in s.items() if k != "path"} for s in old.get("sources", [])] == \
                   [{k: v for k, v in s.items() if k != "path"} for s in meta["sources"]]
    return same_sources and all(old.get(k) == meta[k] for k in key)


def print_table(meta: dict) -> None:
    """Token counts per split, next to the seed write-up's numbers where it reported them (TinyStories)."""
    name, reference = meta["dataset"], meta.get("reference")
    seed = any((reference, s) in SEED_COUNTS for s in meta["splits"])
    head = f"| {'dataset/split':<28} | {'total tokens':>14} | {'entries':>10} | {'skipped':>7} | {'bad bytes':>9} |"
    head += f" {'seed tokens':>12} | {'seed entries':>12} |" if seed else ""
    print(head)
    print("|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|")
    for split, c in meta["splits"].items():
        row = f"| {name + ' ' + split:<28} | {c['tokens']:>14,} | {c['documents']:>10,} | {c['skipped']:>7,} | {c['bad_bytes']:>9,} |"
        if seed:
            st, se = SEED_COUNTS.get((reference, split), (None, None))
            row += f" {st:>12,} | {se:>12,} |" if st else f" {'':>12} | {'':>12} |"
        print(row)
        if "pairs" in c:
            p = c["pairs"]
            print(f"|   {split} pairs: {p['pairs']:,} (story {p['story_tokens']:,} tokens, summary "
                  f"{p['summary_tokens']:,} tokens), {p['skipped']:,} records without Story or Summary skipped")
    print(f"(tokens exclude the eos after each entry; tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']:,})")


# which options each kind of source takes: an option that would be ignored is refused instead
OPTION_KINDS = {"train": ("preset",), "val": ("preset", *FORMATS), "val_fraction": (*FORMATS, "hf"),
                "seed": (*FORMATS, "hf"), "text_field": ("jsonl", "parquet", "hf"), "sample_by": ("text",),
                "hf_config": ("hf",), "train_split": ("hf",), "val_split": ("hf",)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    ap.add_argument("source", metavar="SOURCE", help=f"a preset ({', '.join(DATASETS)}); a format ({', '.join(FORMATS)}) "
                                                     "followed by its files; or hf:NAME, a Hugging Face hub dataset")
    ap.add_argument("files", nargs="*", metavar="FILE", help="text / jsonl / parquet: the training files, read in order")
    ap.add_argument("--train", help="tinystories*: a local train .txt file instead of downloading")
    ap.add_argument("--val", action="append", metavar="FILE",
                    help="a validation file: tinystories* (with --train), or text / jsonl / parquet (repeatable)")
    ap.add_argument("--val-fraction", type=float, metavar="F",
                    help=f"hold out this fraction of the training documents for validation (default {HELD_OUT} when "
                         "no validation data is given), drawn per document with --seed")
    ap.add_argument("--seed", type=int, default=0, help="the held-out draw's seed (default 0)")
    ap.add_argument("--text-field", default="text", metavar="NAME",
                    help="jsonl / parquet / hf: the field (column) that holds each document's text (default text)")
    ap.add_argument("--sample-by", choices=list(SAMPLE_BY), default="line",
                    help="text: one document per line (default); per paragraph (blank lines between documents); "
                         "per <|endoftext|>-separated record (eot); or one per file (document)")
    ap.add_argument("--hf-config", metavar="NAME", help="hf: the dataset's configuration (subset), if it has several")
    ap.add_argument("--train-split", default="train", metavar="NAME", help="hf: the split to train on (default train)")
    ap.add_argument("--val-split", metavar="NAME",
                    help="hf: the validation split (default: validation if the dataset has one, else held out)")
    ap.add_argument("--out-dir", help="output directory (default: data/NAME next to this file; NAME is the preset, "
                                      "the first file's name without extension, or the hub dataset's name)")
    ap.add_argument("--workers", type=int, default=default_workers(), help="tokenizer processes (default: all cores)")
    ap.add_argument("--tokenizer", default="mistral",
                    help="mistral (default), gpt2, t5:HUB_ID_OR_DIR: T5's spiece.model, e.g. t5:google/flan-t5-base, "
                         "or hf:HUB_ID_OR_DIR: an HF model's tokenizer.json, e.g. hf:HuggingFaceTB/SmolLM2-135M")
    a = ap.parse_args(argv)
    kind = "preset" if a.source in DATASETS else "hf" if a.source.startswith("hf:") else a.source
    if kind not in ("preset", *FORMATS, "hf"):
        guess = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(os.path.splitext(a.source)[1], "text")
        hint = f"; for this file: python prepare.py {guess} {a.source}" if os.path.isfile(a.source) else ""
        raise SystemExit(f"prepare.py: unknown SOURCE {a.source!r}: use a preset ({', '.join(DATASETS)}), a format "
                         f"({', '.join(FORMATS)}) followed by its files, or hf:NAME{hint}")
    for option, kinds in OPTION_KINDS.items():
        if getattr(a, option) != ap.get_default(option) and kind not in kinds:
            raise SystemExit(f"prepare.py: --{option.replace('_', '-')} does not apply to {a.source} (it is for "
                             f"{', '.join(k if k != 'preset' else 'the presets' for k in kinds)} sources)")
    cpus = max(default_workers(), os.cpu_count() or 1)
    if not 1 <= a.workers <= cpus:  # each worker tokenizes on one CPU: more of them only cost memory
        raise SystemExit(f"prepare.py: --workers {a.workers} must be between 1 and this machine's {cpus} CPUs")
    if a.out_dir is not None:
        check_out_dir(a.out_dir, "--out-dir")
    try:
        if kind == "preset":
            if a.files or len(a.val or []) > 1:
                raise ValueError(f"{a.source} takes local files as --train FILE --val FILE (one each); for other "
                                 "files use `python prepare.py text|jsonl|parquet FILE ...`")
            prepare(a.source, a.out_dir, a.train, (a.val or [None])[0], a.workers, a.tokenizer)
        else:
            prepare_corpus(a.source, a.files, a.out_dir, a.val or [], a.val_fraction, a.seed, a.text_field, a.sample_by,
                           a.hf_config, a.train_split, a.val_split, a.workers, a.tokenizer)
    except (ValueError, OSError) as e:
        raise SystemExit(f"prepare.py: {e}") from None


EXAMPLES = """examples:
  python prepare.py sample                                 # the bundled TinyStories sample -> data/sample
  python prepare.py text my_corpus.txt --out-dir data/mine # one document per line; then train.py --dataset=mine
  python prepare.py text book1.txt book2.txt --sample-by document --val book3.txt
  python prepare.py jsonl corpus.jsonl --text-field content --val-fraction 0.005
  python prepare.py parquet train-*.parquet --text-field text
  python prepare.py hf:roneneldan/TinyStories              # streamed from the hub (pip install datasets)"""


if __name__ == "__main__":
    main()
