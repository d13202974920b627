"""Stopping a run on a signal without losing its work: SIGTERM (what SLURM, Kubernetes and torchrun send before they
kill a job), SIGUSR1 (what SLURM can send ahead of a time limit: `sbatch --signal=USR1@120`) and SIGINT (Ctrl-C).

    with preempt.handled() as stop:      # around a whole run (train.py, finetune.py, ablation.py)
        ...                              # before the first optimizer step a signal stops the run at once:
        stop.defer()                     # nothing is lost; from here on it only asks the loop to stop, and
        for step in ...:                 # at the end of every optimizer step the loop asks
            ...
            if stop.requested(): save a checkpoint at this step, then raise stop.stopped(...)

so the step in progress is finished and saved, never cut off. Under torchrun every rank sums `stop.flags()` over
the ranks with the step's losses (one all-reduce) and asks `stop.requested(sums)`: a signal that reaches one rank
stops them all after the same step (otherwise one would stop and the others wait in its next all-reduce).

A second signal does not stop the run harder: Ctrl-C under torchrun reaches every worker twice (from the
terminal and from torchrun, which forwards it), as SIGTERM does under SLURM. `kill -9` stops it at once, and
the checkpoints are written so that even that loses nothing but the steps since the last one.

A process forked inside the block (a fork-started worker pool) has no run to save: it starts with the handlers
from before the block, and a signal sent to it at once is not lost (_before_fork).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None)


class Stopped(SystemExit):
    """The run stopped on a signal: one line for the user (a SystemExit, so no traceback), exit status 1.
    `what` says what happened and what was kept, `resume` how to go on (a caller that runs the script, like
    ablation.py, replaces it with its own); quiet: no line (the ranks of torchrun other than 0)."""

    def __init__(self, what: str, resume: str = "", quiet: bool = False):
        self.what, self.resume = what, resume
        super().__init__(1 if quiet else what + (f"; {resume}" if resume else ""))


class Stop:
    """The signals a run received, and what it does with them (see the module docstring)."""

    def __init__(self, say_on_signal: bool = True):
        self.signal = 0           # the first signal received (0: none)
        self.deferred = False     # False: a signal stops the run at once; True: at the end of the step
        self.say = say_on_signal  # write a line when a signal arrives (torchrun: rank 0 only)

    def defer(self) -> None:
        """From now on a signal only asks the loop to stop after its current step (there is work to save)."""
        self.deferred = True

    def handle(self, signum: int, frame) -> None:
        first = not self.signal
        self.signal = self.signal or signum
        if not self.deferred:
            raise Stopped(f"stopped by {signal.Signals(signum).name} with no optimizer step under way: nothing is "
                          "lost", quiet=not self.say)
        if first and self.say:
            say_now(f"\n{signal.Signals(signum).name}: finishing this optimizer step, then saving a checkpoint and "
                    "stopping\n")

    def flags(self) -> list[float]:
        """This rank's signal as one flag per SIGNALS entry, for train.py to sum over the ranks together with the
        step's other numbers (its one all-reduce per step) and hand back to requested()."""
        return [float(self.signal == s) for s in SIGNALS]

    def requested(self, counts: list[float] | None = None) -> bool:
        """Whether a signal asked the run to stop. Under torchrun, counts: flags() summed over the ranks. Every
        rank decides from the same sums, so a signal that reached any rank stops them all after the same step (a
        signal that arrives here after flags() was read counts at the next step)."""
        if counts is None:
            return bool(self.signal)
        agreed = next((s for s, n in zip(SIGNALS, counts) if n > 0), 0)
        self.signal = agreed or self.signal
        return bool(agreed)

    def stopped(self, step: int, saved: str, resume: str) -> Stopped:
        """The one line a stopped run exits with: the signal, the step, what was saved and how to go on."""
        return Stopped(f"stopped by {signal.Signals(self.signal).name} after step {step}: {saved}", resume,
                       quiet=not self.say)


def say_now(text: str) -> None:
    """Write to stderr from a signal handler: os.write on its file descriptor, as print() could interrupt a
    print in progress on the same buffer (RuntimeError: reentrant call); a stderr without one (a test's capture)
    is Python code, where writing is safe."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation is both an OSError and a ValueError)
        sys.stderr.write(text)
        return
    os.write(fd, text.encode())


_active: Stop | None = None  # the Stop of the outermost handled() in this process
_previous: dict = {}           # the handlers it replaced, restored after it (and in a process forked inside it)
_forking = threading.local()   # .mask: the forking thread's signal mask before _before_fork blocked SIGNALS


def _before_fork() -> None:
    """A process forked inside handled() has no run to save: it gets the handlers from before the block back
    (_child_after_fork). Until it has them, SIGNALS must wait: CPython's child clears the signals its handlers
    caught before it resumed Python code, so a SIGTERM sent at once (multiprocessing.Pool.terminate() to a worker
    just started) would be lost, and the worker would wait forever for a queue lock that terminate() holds."""
    if _active is not None:
        _forking.mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def _parent_after_fork() -> None:
    mask = getattr(_forking, "mask", None)
    if mask is not None:
        _forking.mask = None
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _child_after_fork() -> None:
    global _active
    mask = getattr(_forking, "mask", None)
    if mask is not None:
        _active, _forking.mask = None, None
        for s, handler in _previous.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal sent meanwhile acts now


if hasattr(os, "register_at_fork") and hasattr(signal, "pthread_sigmask"):  # POSIX
    os.register_at_fork(before=_before_fork, after_in_parent=_parent_after_fork, after_in_child=_child_after_fork)


@contextmanager
def handled(say_on_signal: bool = True) -> Iterator[Stop]:
    """Handle SIGNALS for the block (restoring the previous handlers after it). Nested blocks (ablation.py
    calling train.main) share the outer one's Stop. Outside the main thread, where Python cannot install
    handlers, the signals keep their default actions."""
    global _active
    if _active is not None:
        deferred = _active.deferred
        try:
            yield _active
        finally:  # back in the outer block (between ablation.py's runs) a signal stops at once again
            _active.deferred = deferred
        return
    stop = Stop(say_on_signal)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    _previous.update({s: signal.signal(s, stop.handle) for s in SIGNALS})
    _active = stop
    try:
        yield stop
    finally:
        _active = None
        for s, handler in _previous.items():
            signal.signal(s, handler)
        _previous.clear()
