"""bench.py smoke test: `--quick` (tiny models, real sample text) runs every section end to end and prints the
table. No timing assertions: speed depends on the machine; BENCHMARKS.md holds the measured numbers."""
import math

import pytest
import torch

import bench

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """bench.main sets torch's thread count; give the rest of the test session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_quick_run_prints_every_section(capsys):
    rows = bench.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    assert {r.section for r in rows} == set("abcdefghi")
    assert "torch " in out and "cores" in out                                # the machine line
    table = out[out.index("benchmark"):]
    for r in rows:
        assert r.rot5 in table                                               # every result is in the table
        if r.ref:
            assert r.ratio is not None and math.isfinite(r.ratio) and r.ratio > 0
        assert r.target is None                                              # tiny shapes never claim a target
    # greedy and beam search: both sides made exactly the tokens asked for (bench.py raises otherwise), and the
    # T5 baseline's token agreement with HF (same weights) is reported for each
    assert out.count("T5 baseline: ROT5 and HF agree on") == 2


def test_markdown_table_and_section_selection(capsys):
    rows = bench.main(["--quick", "--threads", "1", "--only", "d,e", "--markdown"])
    assert [r.section for r in rows] == ["d", "e"]
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("|")]
    assert len(lines) == 2 + len(rows)                                       # header, separator, one per row
    assert len({l.count("|") for l in lines}) == 1                           # same column count everywhere


def test_bad_section_is_one_clear_line():
    with pytest.raises(SystemExit, match="choose sections among a,b,c,d,e,f,g,h,i"):
        bench.main(["--quick", "--only", "a,z"])
