"""Fixtures shared by the test files."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402
from model import ROT5  # noqa: E402

TEST_VAL_STORIES = 64  # validation stories of the sample that train.py runs in tests evaluate on


@pytest.fixture(scope="module")
def short_val_sample(tmp_path_factory) -> str:
    """While the module runs, `prepare.py sample` (prepare.SAMPLE_DIR) reads the real stories.txt and
    instruct.txt but only the first TEST_VAL_STORIES of the 966 genuine validation stories: every train.py run
    ends by evaluating the whole validation split (UL2 and continuation losses), which on all 966 takes about a
    minute per run on one core. Returns the directory standing in for data/sample/."""
    d = tmp_path_factory.mktemp("sample_source")
    for name in ("stories.txt", "instruct.txt"):
        os.symlink(os.path.join(prepare.SAMPLE_DIR, name), d / name)
    sep = prepare.EOT.decode()
    with open(os.path.join(prepare.SAMPLE_DIR, "valid.txt"), encoding="utf-8") as f:
        stories = [r.strip() for r in f.read().split(sep) if r.strip()]
    (d / "valid.txt").write_text("".join(f"{r}\n{sep}\n" for r in stories[:TEST_VAL_STORIES]), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "SAMPLE_DIR", str(d))
        yield str(d)


class NaNLosses:
    """Which training forward passes (1-based, counted from the last reset) return a NaN loss."""

    def __init__(self):
        self.calls, self.at = 0, set()

    def reset(self, at) -> None:
        self.calls, self.at = 0, set(at)


@pytest.fixture
def nan_losses(monkeypatch) -> NaNLosses:
    """Poison ROT5's loss on chosen training forwards (eval and generation forwards are not counted), as a
    bf16 overflow or a corrupt batch would: `nan_losses.reset({3})` makes the 3rd one NaN."""
    state, forward = NaNLosses(), ROT5.forward

    def nan_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            state.calls += 1
            if state.calls in state.at:
                return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(ROT5, "forward", nan_forward)
    return state
