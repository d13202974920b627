"""finetune.py and sample.py on the bundled real data: a tiny UL2 pre-train (train.py) -> fine-tuning on the
real TinyStories-Instruct records -> generated summaries scored with ROUGE-L; the summarization format;
the lead-1 baseline against rouge-score; sample.py's three modes and its one-line errors."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer, tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import finetune  # noqa: E402
import prepare  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import ul2  # noqa: E402
from checkpoint import load_model  # noqa: E402
from batch import shift_right  # noqa: E402
from model import ROT5  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

TINY_MODEL = ["--d_model=64", "--n_heads=4", "--head_dim=16", "--n_kv_heads=2", "--d_ff=128",
              "--n_encoder_layers=2", "--n_decoder_layers=2", "--position=rope"]
ENCODER_LEN = 128  # the tiny pre-train's encoder_len: sample.py refuses longer inputs for its checkpoint


def instruct_records() -> list[dict[str, str]]:
    """The 3 real records of data/sample/instruct.txt as {"Summary": ..., "Story": ..., ...}."""
    with open(os.path.join(ROOT, "data", "sample", "instruct.txt"), encoding="utf-8") as f:
        return [prepare.parse_instruct(r.strip()) for r in f.read().split("<|endoftext|>") if r.strip()]


def real_stories(n: int) -> list[str]:
    with open(os.path.join(ROOT, "data", "sample", "stories.txt"), encoding="utf-8") as f:
        return [s.strip() for s in f.read().split("<|endoftext|>")[:n]]


@pytest.fixture(scope="module")
def run(tmp_path_factory, short_val_sample) -> dict:
    """tmp/data/{sample,sample_instruct} prepared; a 3-step pre-train; the sample fine-tuning config run on it."""
    work = tmp_path_factory.mktemp("finetune")
    cwd = os.getcwd()
    os.chdir(work)  # train.py and finetune.py read data/<dataset> relative to the working directory
    try:
        for name in ("sample", "sample_instruct"):
            with contextlib.redirect_stdout(io.StringIO()):
                prepare.prepare(name, out_dir=os.path.join("data", name), workers=1)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train.main(["--dataset=sample", "--out_dir=pre", *TINY_MODEL, f"--encoder_len={ENCODER_LEN}",
                        "--decoder_len=64", "--batch_size=8", "--micro_batch_size=8", "--max_tokens=4000",
                        "--eval_docs=8", "--eval_batch_size=8", "--log_interval=1", "--device=cpu"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            final = finetune.main([os.path.join(ROOT, "config", "finetune_sample_cpu.py"), "--init_from=pre/ckpt.pt",
                                   "--out_dir=ft", f"--encoder_len={ENCODER_LEN}"])
        yield {"dir": work, "final": final, "stdout": out.getvalue(),
               "pre": str(work / "pre" / "ckpt.pt"), "ft": str(work / "ft" / "ckpt.pt")}
    finally:
        os.chdir(cwd)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# finetune.py end to end

def test_finetune_writes_rouge_predictions_and_checkpoint(run):
    events = read_jsonl(run["dir"] / "ft" / "metrics.jsonl")
    evals = [e for e in events if e["event"] == "eval"]
    trains = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in evals] == [0, 5, 10] and [e["step"] for e in trains] == list(range(1, 11))
    for e in evals:
        assert 0.0 <= e["rougeL"] <= 100.0 and 0.0 < e["lead1_rougeL"] <= 100.0 and e["n_eval"] == 1
    assert trains[-1]["loss"] < trains[0]["loss"] - 0.5  # 10 steps on 2 pairs at lr 1e-3 must fit them a bit
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # both training stories (361 and 342 tokens) are cut to encoder_len=128, once per epoch
    assert trains[-1]["train_truncated"] == 2 * 10 and evals[-1]["val_truncated"] == 1

    # predictions: the held-out real record (prepare.py puts the last of the 3 in val), verbatim references
    rows = read_jsonl(run["dir"] / "ft" / "predictions.jsonl")
    held_out = instruct_records()[-1]
    assert len(rows) == 1 and set(rows[0]) == {"story", "reference", "prediction"}
    assert rows[0]["reference"] == held_out["Summary"] and rows[0]["story"] == held_out["Story"]
    assert evals[-1]["rougeL"] == pytest.approx(finetune.rouge_l([rows[0]["prediction"]], [held_out["Summary"]]))
    assert run["final"]["rougeL"] == evals[-1]["rougeL"]
    assert "NOTE:" in run["stdout"] and "not a real score" in run["stdout"]

    model, tok, ckpt = load_model(run["ft"], "cpu")
    assert ckpt["kind"] == "finetune" and ckpt["step"] == 10 and ckpt["config"]["init_from"] == "pre/ckpt.pt"
    assert ckpt["metrics"]["rougeL"] == evals[-1]["rougeL"] and model.cfg.dropout == 0.1
    pre, _, _ = load_model(run["pre"], "cpu")
    assert not torch.equal(model.embed.weight, pre.embed.weight)  # the fine-tuned weights were saved


def test_lead1_baseline_is_rouge_score_on_the_first_sentence():
    record = instruct_records()[0]  # "Sara and Ben were playing in the park. They liked to climb ..."
    lead = finetune.lead_sentence(record["Story"])
    assert lead == "Sara and Ben were playing in the park."
    direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(record["Summary"], lead)["rougeL"]
    assert finetune.rouge_l([lead], [record["Summary"]]) == pytest.approx(100 * direct.fmeasure)
    # by hand: the summary opens with the lead's 8 words, so LCS = 8: precision 1, recall 8 / |summary|
    n = len(tokenize.tokenize(record["Summary"], None))
    assert finetune.rouge_l([lead], [record["Summary"]]) == pytest.approx(100 * 2 * (8 / n) / (1 + 8 / n))
    # a mean over pairs: a perfect pair (100) and a pair with no word in common (0)
    assert finetune.rouge_l([record["Summary"], "xyzzy"], [record["Summary"], record["Summary"]]) == pytest.approx(50.0)


def test_lead_sentence_on_real_story_openings():
    stories = [r["Story"] for r in instruct_records()]
    assert [finetune.lead_sentence(s) for s in stories[1:]] == ["Lily liked to ride her bike.",
                                                               "Tom and Anna are brother and sister."]
    # a sentence ending in a closing quote keeps it
    assert finetune.lead_sentence('"Mom, I found this needle." Her mom smiled.') == '"Mom, I found this needle."'


def test_summarize_format_and_collate_on_real_pairs():
    tok = get_tokenizer()
    records = instruct_records()
    pairs = [(np.array(tok.encode(r["Story"]), np.uint16), np.array(tok.encode(r["Summary"]), np.uint16)) for r in records]
    ids, cut = finetune.summarize_input(pairs[0][0], tok, 512)
    assert not cut and tok.decode(ids) == "[S] Summarize: " + records[0]["Story"]
    assert ids[0] == tok.mode_ids["S"] and ids[-1] == tok.eos_id

    batch, n_cut = finetune.collate(pairs, tok, encoder_len=100, decoder_len=40, pack=False)
    assert n_cut == 3 and batch.input_ids.shape == (3, 100)  # every story is > 100 tokens: all cut to fit
    assert (batch.input_ids[:, -1] == tok.eos_id).all() and (batch.segment_ids > 0).all()
    # labels = summary + eos (cut to 40), -100 after; the longest is the 47-token summary cut to 39 + eos
    for (_, summary), labels in zip(pairs, batch.labels.tolist()):
        want = [int(i) for i in summary[:39]] + [tok.eos_id]
        assert labels[:len(want)] == want and set(labels[len(want):]) <= {-100}
    # decoder inputs: the labels shifted right behind the start token, the one rule the model's batches follow
    assert torch.equal(batch.decoder_input_ids, shift_right(batch.labels, batch.decoder_segment_ids, tok.pad_id))


def test_fill_gaps_inverts_ul2_span_corruption_on_real_stories():
    tok = get_tokenizer()
    rng = np.random.default_rng(0)
    for text in real_stories(20):
        doc = np.array(tok.encode(text))
        for denoiser in (d for d in ul2.MIXTURE if d.mode != "S"):
            inputs, targets = ul2.corrupt(doc, denoiser, rng, tok)
            filled = sample.fill_gaps(inputs[1:-1].tolist(), targets[:-1].tolist(), tok)
            assert filled == ul2.reconstruct(inputs, targets, tok).tolist() == doc.tolist()
    # a malformed answer (the model skipped gap 1): the other gaps are filled, gap 1 stays visible
    body = tok.encode("One day, a little girl named <extra_id_0> found a <extra_id_1> in her room.", allow_sentinels=True)
    answer = [tok.sentinel_ids[0]] + tok.encode("Lily")
    assert tok.decode(sample.fill_gaps(body, answer, tok)) == "One day, a little girl named Lily found a<extra_id_1> in her room."
    # a sentinel the model writes twice: its first span stands, the repeat is dropped
    answer = [tok.sentinel_ids[0]] + tok.encode("Lily") + [tok.sentinel_ids[1]] + tok.encode("needle") \
        + [tok.sentinel_ids[0]] + tok.encode("Max")
    assert tok.decode(sample.fill_gaps(body, answer, tok)) == "One day, a little girl named Lily found a needle in her room."


# -----------------------------------------------------------------------------
# sample.py

def sample_main(argv: list[str], capsys) -> tuple[list[str], str]:
    outputs = sample.main(argv)
    return outputs, capsys.readouterr().out


def test_sample_continue_batched_like_one_by_one(run, capsys, tmp_path):
    openings = [s.split(".")[0] + "." for s in real_stories(3)]  # "One day, a little girl named Lily found a needle in her room."
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n<|endoftext|>\n".join(openings), encoding="utf-8")
    args = ["--ckpt", run["pre"], "--max-new-tokens", "6", "--device", "cpu"]
    batched, stdout = sample_main(args + ["--prompt-file", str(prompt_file), "--batch-size", "3"], capsys)
    assert len(batched) == 3 and all(out.startswith(p) for out, p in zip(batched, openings))
    assert all(out in stdout for out in batched)
    # padding in a batch must not change greedy outputs
    one_by_one = [sample_main(args + ["--prompt", p], capsys)[0][0] for p in openings]
    assert batched == one_by_one


def test_sample_sampling_is_seeded_and_beam_search_runs(run, capsys, monkeypatch):
    args = ["--ckpt", run["pre"], "--max-new-tokens", "6", "--prompt", real_stories(1)[0][:60]]
    a = sample_main(args + ["--do-sample", "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--seed", "3"], capsys)[0]
    b = sample_main(args + ["--do-sample", "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--seed", "3"], capsys)[0]
    assert a == b
    beams = sample_main(args + ["--num-beams", "3"], capsys)[0]
    assert len(beams) == 1 and beams[0].startswith(real_stories(1)[0][:60])
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tom and Anna are brother and sister.\nLily liked to ride her bike.\n"))
    assert len(sample_main(["--ckpt", run["pre"], "--max-new-tokens", "3", "--prompt", "-"], capsys)[0]) == 2


def test_sample_fill_and_summarize(run, capsys):
    prompt = "One day, a little girl named Lily <extra_id_0> in her room. She knew it was <extra_id_1> to play with it."
    (filled,), stdout = sample_main(["--ckpt", run["pre"], "--mode", "fill", "--max-new-tokens", "8", "--prompt", prompt], capsys)
    assert filled.startswith("One day, a little girl named Lily") and filled.endswith("to play with it.")
    assert "[R]" not in filled and filled in stdout
    # a fine-tuned checkpoint summarizes by default, from finetune.py's input format
    story = instruct_records()[-1]["Story"].split("\n")[0]  # its first paragraph fits encoder_len=128
    (summary,), stdout = sample_main(["--ckpt", run["ft"], "--max-new-tokens", "8", "--prompt", story], capsys)
    assert summary in stdout and "[S]" not in summary and not summary.startswith("Summarize")


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x", "--top-p", "0.9"], "--top-p apply only when sampling: add --do-sample"),
    (["--prompt", "x", "--do-sample", "--num-beams", "2"], "do not combine"),
    (["--prompt", "x", "--prompt-file", "f.txt"], "not both"),
    ([], "no prompt"),
    (["--prompt", "x", "--do-sample", "--temperature", "0"], "--temperature must be > 0"),
    (["--prompt", "x", "--do-sample", "--temperature", "nan"], "--temperature must be > 0: a finite number from 1e-30"),
    (["--prompt", "x", "--do-sample", "--temperature", "1e-320"], "--temperature must be > 0: a finite number from 1e-30"),
    (["--prompt", "x", "--seed", str(2 ** 64)], "--seed must be in [-2**63, 2**64)"),
    (["--prompt", "Lily found a needle.", "--mode", "fill"], "has no gap"),
    (["--prompt", "Lily found a <extra_id_300>.", "--mode", "fill"], "<extra_id_300> does not exist"),
    (["--prompt", "Lily <extra_id_1> a <extra_id_0>.", "--mode", "fill"], "in order, each once"),
    (["--prompt", "Lily <extra_id_0> a <extra_id_0>.", "--mode", "fill"], "in order, each once"),
    (["--prompt", "LONG"], "over this checkpoint's encoder_len=128"),
    (["--prompt", "x", "--denoiser", "X"], "--denoiser picks the mode token of --mode fill"),
    (["--prompt", "x", "--device", "gpu0"], "device 'gpu0' is not a device name"),
    (["--prompt", "x", "--device", "xpu"], "device 'xpu': ROT5 runs on cpu or cuda"),  # parses, not supported
    (["--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0 (got 0.0)"),
    (["--prompt", "x", "--repetition-penalty", "inf"], "--repetition-penalty must be a finite number > 0"),
    (["--prompt", "x", "--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size must be >= 0 (got -1)"),
    (["--prompt", "x", "--min-new-tokens", "-2"], "--min-new-tokens must be in [0, --max-new-tokens=128]"),
    (["--prompt", "x", "--min-new-tokens", "9", "--max-new-tokens", "8"], "raise --max-new-tokens or lower it"),
])
def test_sample_errors_are_one_line(run, argv, message):
    argv = [(" ".join(real_stories(3)) if a == "LONG" else a) for a in argv]
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", run["pre"], *argv])
    assert message in str(e.value.code) and "\n" not in str(e.value.code)


def test_sample_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    for path, message in [(tmp_path / "missing.pt", "no checkpoint at"),
                          (os.path.join(ROOT, "data", "sample", "SOURCES.md"), "is not a readable checkpoint")]:
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(path), "--prompt", "Once upon a time"])
        assert message in str(e.value.code) and "\n" not in str(e.value.code)


def test_sample_cli_missing_checkpoint_exits_with_one_line(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(tmp_path / "nope.pt"),
                        "--prompt", "Once upon a time"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and "no checkpoint at" in p.stderr and "Traceback" not in p.stderr


def test_sample_never_generates_non_text_tokens(run, capsys, monkeypatch):
    """continue/summarize suppress pad, mode tokens and sentinels; fill keeps the sentinels it must write.
    (That suppression itself equals HF's: tests/test_hf_parity.py.)"""
    import sample
    tok, seen, generate = get_tokenizer(), {}, sample.generate

    def recording_generate(*args, **kwargs):
        seen["suppress"] = kwargs["suppress_tokens"]
        return generate(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", recording_generate)
    sample_main(["--ckpt", run["pre"], "--max-new-tokens", "4", "--prompt", real_stories(1)[0][:60]], capsys)
    assert set(seen["suppress"]) == {tok.pad_id, *tok.mode_ids.values(), *tok.sentinel_ids}
    sample_main(["--ckpt", run["pre"], "--mode", "fill", "--max-new-tokens", "4", "--prompt", "Lily <extra_id_0>."], capsys)
    assert set(seen["suppress"]) == {tok.pad_id, *tok.mode_ids.values()}


def test_sample_passes_the_generation_controls(run, capsys, monkeypatch):
    """--repetition-penalty, --no-repeat-ngram-size and --min-new-tokens reach generate (whose controls equal
    HF's: tests/test_hf_parity.py) and act: no token twice with --no-repeat-ngram-size 1, no eos before 6."""
    tok, seen, generate = get_tokenizer(), {}, sample.generate

    def recording_generate(*args, **kwargs):
        seen.update(kwargs, out=generate(*args, **kwargs))
        return seen["out"]

    monkeypatch.setattr(sample, "generate", recording_generate)
    args = ["--ckpt", run["pre"], "--max-new-tokens", "8", "--prompt", real_stories(1)[0][:60]]
    sample_main(args + ["--repetition-penalty", "1.3", "--no-repeat-ngram-size", "1", "--min-new-tokens", "6"], capsys)
    assert (seen["repetition_penalty"], seen["no_repeat_ngram_size"], seen["min_new_tokens"]) == (1.3, 1, 6)
    ids = seen["out"][0].tolist()
    assert len(set(ids)) == len(ids) and tok.eos_id not in ids[:6]
    sample_main(args, capsys)  # off by default, HF's defaults
    assert (seen["repetition_penalty"], seen["no_repeat_ngram_size"], seen["min_new_tokens"]) == (1.0, 0, 0)


def test_fill_mode_marks_what_it_inserted():
    """Each inserted span between [[ and ]], word-start spaces outside; without the marks, the plain filled text;
    a gap the model left out stays its sentinel, unmarked."""
    tok = get_tokenizer()
    body = tok.encode("One day, a little girl named Lily found a <extra_id_0> in her <extra_id_1>. She <extra_id_2>",
                      allow_sentinels=True)
    answer = tok.encode("<extra_id_0> shiny needle<extra_id_1> room<extra_id_2> smiled.", allow_sentinels=True)
    marked = sample.marked_fill(body, answer, tok)
    assert marked == "One day, a little girl named Lily found a [[shiny needle]] in her [[room]]. She [[smiled.]]"
    assert marked.replace("[[", "").replace("]]", "") == tok.decode(sample.fill_gaps(body, answer, tok))
    answer = tok.encode("<extra_id_0> needle<extra_id_2> smiled.", allow_sentinels=True)
    assert sample.marked_fill(body, answer, tok) == \
        "One day, a little girl named Lily found a [[needle]] in her<extra_id_1>. She [[smiled.]]"
    filled = sample.render("fill", tok.mode_prefix("R") + body + [tok.eos_id], answer + [tok.eos_id], tok)
    assert filled == sample.marked_fill(body, answer, tok)


def test_continue_joins_prompt_and_continuation_as_one_text():
    """The continuation is decoded with the prompt, as one text: its first word keeps its space, a word the prompt
    ends inside is completed without one, and no character is added at the join. (A continuation that starts with
    "." -- "Max.." -- is the model's first token: a small model's first step predicts the most frequent token,
    ".", whatever the prompt; see README, sample.py.)"""
    tok = get_tokenizer()
    for text, cut in [("Once upon a time, there was a little dog named Max. He liked to run.", "Max."),  # "▁He"
                      ("Once upon a time, there was a little dog named Max.\nHe liked to run.", "Max."),  # "<0x0A>"
                      ("Once upon a time, there was a little dog named Bingley. He liked to run.", "Bing")]:  # "ley"
        prompt = text[:text.index(cut) + len(cut)]
        ids = tok.encode(text)
        k = len(tok.encode(prompt))
        assert ids[:k] == tok.encode(prompt)  # the prompt's tokens start the text's: a split the model can write
        inputs = tok.mode_prefix("S") + ids[:k] + [tok.eos_id]
        assert sample.render("continue", inputs, ids[k:] + [tok.eos_id], tok) == text


def test_sample_ckpt_defaults_to_the_quick_start_checkpoint(tmp_path, monkeypatch):
    assert sample.quick_start_ckpt() == os.path.join("out", "sample_cpu", "ckpt.pt")  # config/sample_cpu.py's out_dir
    assert sample.parse_args(["--prompt", "x"]).ckpt == sample.quick_start_ckpt()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "Once upon a time"])
    message = str(e.value.code)
    assert "\n" not in message and "python train.py config/sample_cpu.py" in message and "--ckpt PATH" in message


def test_sample_reads_prompts_that_are_not_utf8(run, capsys, monkeypatch, tmp_path):
    """Bad bytes become U+FFFD, as prepare.py reads data: from argv (surrogate escapes) and from a file."""
    story = real_stories(1)[0][:40]
    bad = (story + " \udcff").encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")  # byte 0xff
    args = ["--ckpt", run["pre"], "--max-new-tokens", "2"]
    (out,), _ = sample_main(args + ["--prompt", bad], capsys)
    assert out.startswith(story + " \ufffd")
    prompt_file = tmp_path / "bad.txt"
    prompt_file.write_bytes(story.encode() + b" \xff")
    (out,), _ = sample_main(args + ["--prompt-file", str(prompt_file)], capsys)
    assert out.startswith(story + " \ufffd")


def test_finetune_grad_clip_zero_means_no_clipping(run, monkeypatch):
    """grad_clip=0 is "no clipping" (it used to scale every gradient by 0: nothing trained); < 0 is refused."""
    monkeypatch.chdir(run["dir"])
    argv = [os.path.join(ROOT, "config", "finetune_sample_cpu.py"), "--init_from=pre/ckpt.pt",
            f"--encoder_len={ENCODER_LEN}", "--epochs=3.0", "--eval_pairs=1", "--eval_batch_size=1",
            "--weight_decay=0.0"]  # 3 steps (the first has lr 0: warm-up); no decay: only gradients move weights
    with contextlib.redirect_stdout(io.StringIO()):
        finetune.main(argv + ["--out_dir=ft_noclip", "--grad_clip=0.0"])
    before, after = (load_model(p, "cpu")[0].state_dict() for p in ("pre/ckpt.pt", "ft_noclip/ckpt.pt"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SystemExit, match="--grad_clip=-1.0 must be >= 0"):
        finetune.main(argv + ["--out_dir=ft_bad", "--grad_clip=-1.0"])


def finetune_argv(*extra: str) -> list[str]:
    return [os.path.join(ROOT, "config", "finetune_sample_cpu.py"), "--init_from=pre/ckpt.pt",
            f"--encoder_len={ENCODER_LEN}", "--eval_pairs=1", "--eval_batch_size=1", *extra]


def test_finetune_skips_non_finite_steps(run, monkeypatch, nan_losses):
    """As train.py: a NaN loss skips its update (the weights stay finite), max_bad_steps in a row stop the run."""
    monkeypatch.chdir(run["dir"])
    nan_losses.reset({3})  # the first micro-batch of step 2 of 3 (the config accumulates 2 x 1 pairs)
    with contextlib.redirect_stdout(io.StringIO()):
        finetune.main(finetune_argv("--out_dir=ft_nan", "--epochs=3.0", "--log_interval=3"))
    events = read_jsonl(run["dir"] / "ft_nan" / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "skip"] == [2]
    (logged,) = [e for e in events if e["event"] == "train"]  # steps 1-3: the means of the 2 updates made
    assert logged["step"] == 3 and math.isfinite(logged["loss"]) and math.isfinite(logged["grad_norm"])
    assert all(torch.isfinite(v).all() for v in load_model("ft_nan/ckpt.pt", "cpu")[0].state_dict().values())

    nan_losses.reset(range(1, 100))
    with contextlib.redirect_stdout(io.StringIO()), \
            pytest.raises(SystemExit, match=r"2 non-finite steps in a row \(up to step 2\)"):
        finetune.main(finetune_argv("--out_dir=ft_nan_stop", "--epochs=3.0", "--max_bad_steps=2"))


def test_finetune_refuses_data_of_another_tokenizer_and_a_bad_device(run, monkeypatch):
    monkeypatch.chdir(run["dir"])
    real_load_meta = prepare.load_meta
    monkeypatch.setattr(prepare, "load_meta", lambda d: {**real_load_meta(d), "tokenizer": "gpt2"})
    with contextlib.redirect_stdout(io.StringIO()), \
            pytest.raises(SystemExit, match=r"was tokenized with 'gpt2' but pre/ckpt.pt uses 'mistral'"):
        finetune.main(finetune_argv("--out_dir=ft_tok"))
    monkeypatch.setattr(prepare, "load_meta", real_load_meta)
    with pytest.raises(SystemExit, match="device 'tpu' is not a device name"):
        finetune.main(finetune_argv("--out_dir=ft_dev", "--device=tpu"))


def test_finetune_resume_equals_uninterrupted_and_never_overwrites(run, monkeypatch):
    """A run killed at step 3 and resumed from its step-2 checkpoint, and a run stopped by SIGUSR1 in step 3 and
    resumed from the checkpoint that step saved, end with the very weights of an uninterrupted run (pair order,
    dropout masks and AdamW state restored); a new run refuses the out_dir."""
    monkeypatch.chdir(run["dir"])
    argv = finetune_argv("--epochs=4.0", "--eval_interval=2")  # 4 steps of 2 micro-batches; checkpoints at 0, 2, 4
    with contextlib.redirect_stdout(io.StringIO()):
        finetune.main(argv + ["--out_dir=ft_whole"])

    forward, calls = ROT5.forward, []

    def crash_at_step_3(self, *args, **kwargs):
        calls.extend([1] if self.training else [])
        if len(calls) == 5:  # the first micro-batch of step 3
            raise RuntimeError("killed")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ROT5, "forward", crash_at_step_3)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(RuntimeError, match="killed"):
        finetune.main(argv + ["--out_dir=ft_resumed"])
    monkeypatch.setattr(ROT5, "forward", forward)
    with pytest.raises(SystemExit, match=r"ft_resumed/ckpt.pt exists: continue that run with --resume=True"):
        finetune.main(argv + ["--out_dir=ft_resumed"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        finetune.main(argv + ["--out_dir=ft_resumed", "--resume=True"])
    assert "resuming ft_resumed/ckpt.pt at step 2" in out.getvalue()

    # SIGUSR1 (SLURM's warning ahead of a time limit) in step 3: the step is finished and saved, though no
    # evaluation falls there, and resuming goes on from it
    def forward_then_sigusr1(self, *args, **kwargs):
        calls.extend([1] if self.training else [])
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
        return forward(self, *args, **kwargs)

    def unhandled(signum, frame):  # (the default action would end pytest itself)
        raise AssertionError("finetune.py left SIGUSR1 to its default action: the process dies, step 3 is lost")

    calls.clear()
    monkeypatch.setattr(ROT5, "forward", forward_then_sigusr1)
    before = signal.signal(signal.SIGUSR1, unhandled)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                pytest.raises(SystemExit) as e:
            finetune.main(argv + ["--out_dir=ft_stopped"])
    finally:
        signal.signal(signal.SIGUSR1, before)
    monkeypatch.setattr(ROT5, "forward", forward)
    assert e.value.code == ("stopped by SIGUSR1 after step 3: saved ft_stopped/ckpt.pt at that step; continue with "
                            "the same command and --resume=True")
    assert load_model("ft_stopped/ckpt.pt", "cpu")[2]["step"] == 3
    with contextlib.redirect_stdout(io.StringIO()):
        finetune.main(argv + ["--out_dir=ft_stopped", "--resume=True"])

    whole, *others = (load_model(f"{d}/ckpt.pt", "cpu")[0].state_dict() for d in ("ft_whole", "ft_resumed", "ft_stopped"))
    assert all(torch.equal(whole[k], other[k]) for other in others for k in whole)
    logs = [[(e["event"], e["step"], e.get("loss"), e.get("val_loss"), e.get("rougeL"))
             for e in read_jsonl(run["dir"] / d / "metrics.jsonl")] for d in ("ft_whole", "ft_resumed", "ft_stopped")]
    assert logs[0] == logs[1] == logs[2]  # the log, too, reads as one run (the config logs every step)


def test_finetune_shows_a_progress_bar_and_a_finished_run_says_so(run, monkeypatch, capsys):
    """A tqdm bar like train.py's (on stderr, its ETA without the evaluations), the log lines above it on stdout;
    resuming the finished run says so and changes nothing."""
    monkeypatch.chdir(run["dir"])
    bars, real_step_bar = [], finetune.step_bar
    monkeypatch.setattr(finetune, "step_bar", lambda *a, **k: bars.append(real_step_bar(*a, **k)) or bars[-1])
    argv = finetune_argv("--epochs=4.0", "--eval_interval=2", "--out_dir=ft_bar")
    finetune.main(argv)
    out = capsys.readouterr()
    assert bars[0].n == bars[0].total == 4 and re.search(r"4/4 \[.*(step/s|s/step)", out.err)
    assert "step 1/4 | loss" in out.out and "eval step 2: val_loss" in out.out and "4/4 [" not in out.out
    before = open("ft_bar/metrics.jsonl", "rb").read()
    finetune.main(argv + ["--resume=True"])
    assert "ft_bar/ckpt.pt already finished its 4 steps: nothing to do; to train further raise epochs" in \
        capsys.readouterr().out
    assert open("ft_bar/metrics.jsonl", "rb").read() == before


def test_finetune_resume_errors_and_a_step_0_checkpoint(run, monkeypatch):
    monkeypatch.chdir(run["dir"])
    with pytest.raises(SystemExit, match=r"--resume=True but nothing/ckpt.pt does not exist: nothing to resume"):
        finetune.main(finetune_argv("--out_dir=nothing", "--resume=True"))
    forward = ROT5.forward

    def crash_when_training(self, *args, **kwargs):
        if self.training:
            raise RuntimeError("killed")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ROT5, "forward", crash_when_training)  # killed after the step-0 evaluation
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(RuntimeError, match="killed"):
        finetune.main(finetune_argv("--out_dir=ft_step0", "--epochs=1.0"))
    monkeypatch.setattr(ROT5, "forward", forward)
    with contextlib.redirect_stdout(io.StringIO()):
        finetune.main(finetune_argv("--out_dir=ft_step0", "--epochs=1.0", "--resume=True"))
    events = read_jsonl(run["dir"] / "ft_step0" / "metrics.jsonl")
    assert [(e["event"], e["step"]) for e in events] == [("eval", 0), ("train", 1), ("eval", 1)]
