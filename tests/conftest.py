"""Fixtures shared by the test files."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ROT5  # noqa: E402


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
