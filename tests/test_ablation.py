"""ablation.py end to end at toy size on the bundled real TinyStories sample: two variants x two seeds
pre-trained for 2 steps on the same documents, the fine-tuning comparison on the real Instruct records, the
statistics over seeds, results.md and the charts; re-running skips finished runs, changed settings are
refused; the step budget and the MoE's active-parameter count are exact; users' own config files are
variants."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ablation  # noqa: E402

# A toy model and batch (the rest comes from config/ablation_cpu.py): seconds per run on a CPU.
TINY = ["--d_model=64", "--n_heads=4", "--head_dim=16", "--d_ff=128", "--encoder_len=128", "--decoder_len=64",
        "--batch_size=8", "--micro_batch_size=8", "--eval_docs=8", "--eval_batch_size=8", "--log_interval=1",
        "--eval_interval=1"]
ARGV = ["--variants", "t5_base,rot5_base_gqa", "--seeds", "0,1", "--steps", "2", "--out", "abl", *TINY]
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def study(tmp_path_factory, short_val_sample) -> dict:
    """The study run once in a fresh directory (train.py and finetune.py read data/ relative to it)."""
    work = tmp_path_factory.mktemp("ablation")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        yield {"dir": work, "result": ablation.main(ARGV)}
    finally:
        os.chdir(cwd)


def events(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_variants_trained_at_matched_compute(study):
    for seed in SEEDS:
        runs = {name: events(study["dir"] / "abl" / f"seed{seed}" / name / "metrics.jsonl")
                for name in ("t5_base", "rot5_base_gqa")}
        for name, ev in runs.items():
            assert [e["step"] for e in ev if e["event"] == "eval_full"] == [2], name
        # the same documents in the same order: identical token counts at every logged step
        tokens = {name: [(e["step"], e["tokens"]) for e in ev if e["event"] == "train"] for name, ev in runs.items()}
        assert tokens["t5_base"] == tokens["rot5_base_gqa"] and len(tokens["t5_base"]) == 2
        # each variant is its preset's change, shrunk: T5 bias + multi-head vs RoPE + 2 of 4 K/V heads
        configs = {name: json.loads((study["dir"] / "abl" / f"seed{seed}" / name / "ablation.json").read_text())["config"]
                   for name in runs}
        assert (configs["t5_base"]["position"], configs["t5_base"]["n_kv_heads"]) == ("t5", 4)
        assert (configs["rot5_base_gqa"]["position"], configs["rot5_base_gqa"]["n_kv_heads"]) == ("rope", 2)
        assert all(c["dataset"] == "sample" and c["d_model"] == 64 and c["seed"] == seed for c in configs.values())
    # another seed is another run: other documents (and initial weights), so another loss
    first = {seed: events(study["dir"] / "abl" / f"seed{seed}" / "t5_base" / "metrics.jsonl")[1] for seed in SEEDS}
    assert first[0]["event"] == first[1]["event"] == "train" and first[0]["loss"] != first[1]["loss"]


def test_statistics_over_seeds(study):
    """Each variant's mean and sd over seeds, and the paired difference to the baseline, from the metrics files."""
    pre = study["result"]["pretrain"]
    full = {(name, seed): [e for e in events(study["dir"] / "abl" / f"seed{seed}" / name / "metrics.jsonl")
                           if e["event"] == "eval_full"][0] for name in pre for seed in SEEDS}
    for name, row in pre.items():
        for metric, key in (("full_val_loss", "val_loss"), ("continuation_loss", "continuation_loss")):
            values = [full[name, s][key] for s in SEEDS]
            assert row[metric].mean == pytest.approx(sum(values) / 2, rel=1e-12)
            assert row[metric].sd == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, rel=1e-9)
    d = pre["rot5_base_gqa"]["vs_baseline"]["full_val_loss"]
    diffs = [full["rot5_base_gqa", s]["val_loss"] - full["t5_base", s]["val_loss"] for s in SEEDS]
    half = 12.7062047 * abs(diffs[0] - diffs[1]) / 2 ** 0.5 / 2 ** 0.5  # t(0.975, 1 df) * sd / sqrt(n)
    assert d.mean == pytest.approx(sum(diffs) / 2, rel=1e-12)
    assert (d.low, d.high) == (pytest.approx(d.mean - half, rel=1e-6), pytest.approx(d.mean + half, rel=1e-6))
    assert pre["t5_base"]["vs_baseline"] == {}


def test_paired_interval_and_significance():
    """Student-t quantiles (the table's, to its 4 decimals), and the pairing: a large per-seed offset shared by
    variant and baseline (the seed's documents) leaves the paired interval untouched."""
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert ablation.t_quantile(0.975, df) == pytest.approx(t, abs=6e-5)
    d = ablation.paired([0.1, 0.2, 0.3])  # mean 0.2, sd 0.1: half-width 4.3027 * 0.1 / sqrt(3) = 0.2484
    assert (d.mean, d.low, d.high) == (pytest.approx(0.2), pytest.approx(-0.0484, abs=1e-4), pytest.approx(0.4484, abs=1e-4))
    assert d.significant is False
    assert ablation.paired([-0.05, -0.06, -0.04]).significant is True
    assert ablation.paired([0.05]).significant is None  # one seed: no interval, no test
    offsets = {0: 0.0, 1: 0.5, 2: -0.4}  # seed-to-seed noise ten times the effect
    base = {s: {"loss": 5.0 + o} for s, o in offsets.items()}
    variant = {s: {"loss": 4.95 + o + e} for (s, o), e in zip(offsets.items(), (0.0, 0.004, -0.004))}
    agg = ablation.aggregate(variant, ("loss",), base)
    assert agg["loss"].sd > 0.4  # unpaired, the 0.05 gain is lost in the noise ...
    assert agg["vs_baseline"]["loss"].significant and agg["vs_baseline"]["loss"].high < 0  # ... paired, it is clear
    assert "**reproduced** (significant)" == ablation.verdict(agg["vs_baseline"]["loss"])


def test_finetunes_baseline_and_best_and_writes_results(study):
    pre, post = study["result"]["pretrain"], study["result"]["finetune"]
    assert list(post) == ["t5_base", "rot5_base_gqa"]  # the baseline, then the only (so best) upgrade
    for name, row in post.items():
        finals = []
        for seed in SEEDS:
            run = study["dir"] / "abl" / f"seed{seed}" / f"{name}_summary"
            finals.append([e for e in events(run / "metrics.jsonl") if e["event"] == "eval"][-1]["rougeL"])
            assert (run / "predictions.jsonl").exists()
            assert json.loads((run / "ablation.json").read_text())["config"]["seed"] == seed
        assert row["rougeL"].mean == pytest.approx(sum(finals) / 2) and 0.0 <= row["rougeL"].mean <= 100.0
    table = (study["dir"] / "abl" / "results.md").read_text()
    for name, row in pre.items():
        assert f"**{ablation.spread(row['full_val_loss'])}**" in table and row["label"] in table
        for seed in SEEDS:
            assert f"{row['seeds'][seed]['full_val_loss']:.3f}" in table
    d = pre["rot5_base_gqa"]["vs_baseline"]["full_val_loss"]
    assert f"| +RoPE +GQA | {d.mean:+.3f} | [{d.low:+.3f}, {d.high:+.3f}] |" in table
    assert "+RoPE +GQA < T5:" in table  # the write-up's ordering, with its verdict
    assert f"**{ablation.spread(post['rot5_base_gqa']['rougeL'], '.2f')}**" in table


def test_charts(study):
    pytest.importorskip("matplotlib")
    for name in ablation.CHARTS:
        data = (study["dir"] / "abl" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000, name


def test_rerun_skips_finished_runs_and_refuses_changed_settings(study, capsys, monkeypatch):
    monkeypatch.chdir(study["dir"])
    paths = [study["dir"] / "abl" / f"seed{s}" / d / "metrics.jsonl" for s in SEEDS
             for d in ("t5_base", "rot5_base_gqa", "t5_base_summary")]
    before = [p.stat().st_mtime_ns for p in paths]
    again = ablation.main(ARGV)
    assert [p.stat().st_mtime_ns for p in paths] == before
    assert again["pretrain"]["t5_base"]["full_val_loss"] == study["result"]["pretrain"]["t5_base"]["full_val_loss"]
    out = capsys.readouterr().out
    assert out.count("done before") == 8 and "python train.py" not in out and "python finetune.py" not in out
    with pytest.raises(SystemExit, match="other settings.*epochs"):
        ablation.main([a if a != "2" else "3" for a in ARGV])


def test_steps_budget_is_exact(study, monkeypatch):
    """--steps N becomes an epochs budget; train.py's rule ceil(epochs * docs / batch) must give exactly N."""
    monkeypatch.chdir(study["dir"])  # its data/sample: 7,204 training documents
    variant = ablation.VARIANTS[0]
    for steps in (1, 2, 7, 53, 105, 106, 1000):
        for batch in (8, 32, 300):
            args, _ = ablation.parse_args(["--steps", str(steps)])
            argv, config = ablation.pretrain_args(variant, args, [f"--batch_size={batch}", "--micro_batch_size=1"], 0)
            assert ablation.planned_steps(config) == steps, (steps, batch)


def test_moe_matches_dense_active_parameters():
    """Top-1 Switch: a token uses one expert the size of the dense FFN, so MoE's active parameters are the
    dense GQA model's plus the routers (d_model x experts per MoE layer, every other layer of both stacks)."""
    args, _ = ablation.parse_args([])
    gqa = ablation.pretrain_args(ablation.VARIANTS[2], args, [], 0)[1]
    moe = ablation.pretrain_args(ablation.VARIANTS[3], args, [], 0)[1]
    (gqa_total, gqa_active), (moe_total, moe_active) = ablation.param_counts(gqa), ablation.param_counts(moe)
    n_moe_layers = moe["n_encoder_layers"] // 2 + moe["n_decoder_layers"] // 2
    assert gqa_total == gqa_active
    assert moe_active - gqa_active == n_moe_layers * moe["d_model"] * moe["n_experts"]
    assert moe_total > moe_active and moe["n_experts"] == ablation.CPU_EXPERTS


def test_bad_input_is_one_clear_line():
    with pytest.raises(SystemExit, match="t5_large: neither a preset .* nor an existing config file"):
        ablation.parse_args(["--variants", "t5_large"])
    with pytest.raises(SystemExit, match="each once"):
        ablation.parse_args(["--variants", f"{ROOT}/config/t5_base.py,t5_base"])
    for seeds in ("a", "0,0", "-1", ""):
        with pytest.raises(SystemExit, match="--seeds .*distinct integers"):
            ablation.parse_args(["--seeds", seeds])
    with pytest.raises(SystemExit, match="use --seeds"):
        ablation.parse_args(["--seed=1"])
    with pytest.raises(SystemExit, match="what the variants differ in"):
        ablation.parse_args(["--n_kv_heads=1"])
    with pytest.raises(SystemExit, match="--key=value"):
        ablation.parse_args(["d_model=64"])
    with pytest.raises(SystemExit, match="--steps and --epochs both set the pre-training budget"):
        ablation.parse_args(["--steps", "3", "--epochs=2"])


def test_wall_time_adds_up_interrupted_invocations(tmp_path, monkeypatch):
    """A run interrupted after 30 s (with a checkpoint) and resumed for 20 s cost 50 s."""
    clock = {"t": 0.0}
    monkeypatch.setattr(ablation.time, "perf_counter", lambda: clock["t"])
    run_dir = tmp_path / "run"

    def script(seconds: float, crash: bool):
        def script_main(argv):
            (run_dir / "ckpt.pt").write_bytes(b"")  # a checkpoint to resume from
            clock["t"] += seconds
            if crash:
                raise KeyboardInterrupt
            return {"argv": argv}
        return script_main

    def state() -> dict:
        return json.loads((run_dir / "ablation.json").read_text())

    with pytest.raises(KeyboardInterrupt):
        ablation.run_once(str(run_dir), {"d_model": 64}, script(30.0, crash=True), [], "test")
    assert state() == {"config": {"d_model": 64}, "result": None, "wall_s": 30.0}
    ablation.run_once(str(run_dir), {"d_model": 64}, script(20.0, crash=False), [], "test")
    assert state() == {"config": {"d_model": 64}, "result": {"argv": ["--resume=True"]}, "wall_s": 50.0}


def test_flan_row_fine_tunes_an_hf_t5_the_same_way(study, hf_t5_dirs, monkeypatch, capsys):
    """--flan=DIR (a tiny random HF T5 v1.1 with the stand-in T5 tokenizer; --flan alone is FLAN-T5-Base from the
    hub): the finished runs are skipped, the HF model is fine-tuned by the same finetune.py preset on the same
    real pairs tokenized with its own tokenizer, and its row joins the summarization table."""
    monkeypatch.chdir(study["dir"])
    hf_dir = hf_t5_dirs["gated-gelu"]
    result = ablation.main(ARGV + [f"--flan={hf_dir}"])
    post = result["finetune"]
    assert list(post) == ["t5_base", "rot5_base_gqa", "hf_t5"]
    assert post["t5_base"]["rougeL"] == study["result"]["finetune"]["t5_base"]["rougeL"]  # skipped, not re-run
    configs = {name: json.loads((study["dir"] / "abl" / "seed1" / f"{name}_summary" / "ablation.json").read_text())["config"]
               for name in ("t5_base", "hf_t5")}
    assert (configs["hf_t5"]["init_from"], configs["hf_t5"]["dataset"]) == (hf_dir, "sample_instruct_t5")
    same = ("train_pairs", "epochs", "batch_size", "learning_rate", "warmup_frac", "eval_pairs", "seed")
    assert all(configs["hf_t5"][k] == configs["t5_base"][k] for k in same)
    meta = ablation.prepare.load_meta(os.path.join("data", "sample_instruct_t5"))
    assert meta["tokenizer"] == f"t5:{hf_dir}" and meta["splits"]["val"]["pairs"]["pairs"] == 1
    table = (study["dir"] / "abl" / "results.md").read_text()
    assert f"| HF T5 {hf_dir} |" in table and f"**{ablation.spread(post['hf_t5']['rougeL'], '.2f')}**" in table
    assert "fine-tuning HF T5" in capsys.readouterr().out


def test_own_config_files_are_variants(tmp_path):
    """--variants FILE,FILE: the files in the order given, the first the baseline, named after the files, each
    shrunk by the CPU scale like a preset; a change the CPU scale would overwrite, or another budget, is refused."""
    (tmp_path / "rope.py").write_text('position = "rope"\n')
    (tmp_path / "wide.py").write_text('position = "t5"\nd_ff = 4096\n')
    (tmp_path / "big_batch.py").write_text('batch_size = 512\n')
    args, _ = ablation.parse_args(["--variants", f"{ROOT}/config/t5_base.py,{tmp_path / 'rope.py'}", "--seeds", "3"])
    assert [(v.name, v.label) for v in args.variants] == [("t5_base", "T5"), ("rope", "rope")]
    configs = {v.name: ablation.pretrain_args(v, args, [], 3)[1] for v in args.variants}
    ablation.check_matched(args.variants, configs)
    assert (configs["t5_base"]["position"], configs["rope"]["position"]) == ("t5", "rope")
    assert all(c["d_model"] == 256 and c["seed"] == 3 and c["batch_size"] == 16 for c in configs.values())
    assert configs["rope"]["out_dir"] == os.path.join("out", "ablation", "seed3", "rope")
    args, _ = ablation.parse_args(["--variants", f"{ROOT}/config/t5_base.py,{tmp_path / 'wide.py'}"])
    with pytest.raises(SystemExit, match=r"wide.py changes d_ff=4096 \(baseline 3072\), which the CPU scale sets"):
        ablation.pretrain_args(args.variants[1], args, [], 0)
    args, _ = ablation.parse_args(["--scale", "full", "--variants", f"{ROOT}/config/t5_base.py,{tmp_path / 'big_batch.py'}"])
    configs = {v.name: ablation.pretrain_args(v, args, [], 0)[1] for v in args.variants}
    with pytest.raises(SystemExit, match="big_batch.py trains with batch_size=512, the baseline .* with 300; .*matched"):
        ablation.check_matched(args.variants, configs)


def test_plan_at_the_cpu_scale_times_steps_and_prepares_nothing(study, monkeypatch, capsys):
    """--plan: CPU time from steps timed here (no GPU columns of zeros), the last run's measured wall time beside
    it; nothing tokenized, trained or written."""
    monkeypatch.chdir(study["dir"])
    monkeypatch.setattr(ablation.prepare, "prepare", lambda *a, **k: pytest.fail("--plan tokenized data"))
    before = {p: os.stat(p).st_mtime_ns for p in (study["dir"] / "abl").rglob("*")}
    capsys.readouterr()
    assert ablation.main(["--plan", *ARGV]) == {}
    out = capsys.readouterr().out
    assert f"on {ablation.cpu_name()}" in out and "H100" not in out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines()
            if line.startswith("| pre-train")}
    assert set(rows) == {"pre-train t5_base", "pre-train rot5_base_gqa"}
    for name, cells in rows.items():
        assert float(cells[3]) > 0 and cells[2] == "2 x 8"  # seconds per step, measured; the study's steps
        wall = json.loads((study["dir"] / "abl" / "seed0" / name.split()[1] / "ablation.json").read_text())["wall_s"]
        assert cells[7].strip(" |") == f"{wall / 60:.1f} min"  # the last run, measured
    assert {p: os.stat(p).st_mtime_ns for p in (study["dir"] / "abl").rglob("*")} == before


def test_one_seed_is_no_statistics():
    assert ablation.verdict(ablation.paired([-0.09])) == "one seed: no statistics"
    assert ablation.verdict(ablation.paired([0.09])) == "one seed: no statistics"
