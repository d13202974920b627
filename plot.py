"""Loss curves and experiment tracking, from the events a run logs (its metrics.jsonl).

    python plot.py out/sample_cpu                       # one run -> curves.png
    python plot.py out/A out/B --out compare.png        # runs overlaid, one colour each

train.py and finetune.py redraw out_dir/curves.png at every evaluation (Tracker): training loss (the LM
loss, comparable with the validation loss), validation loss, continuation loss, the validation loss of each
UL2 mode, ROUGE-L (fine-tuning), learning rate and tokens/s. Curves share the x axis "tokens" (training
tokens) when every run logs them (pre-training), else "step". matplotlib is optional: without it a run says
so once and trains on.

Experiment trackers, optional too, under the ecosystem's config keys: `wandb_log`, `wandb_project`,
`wandb_run_name` (Weights & Biases, as nanoGPT; WANDB_MODE=offline keeps the run on disk) and
`tensorboard_log` (TensorBoard event files in out_dir/tensorboard: `tensorboard --logdir out`). Every number
of every event goes there as "<event>/<key>" at the event's step (e.g. train/loss, eval/val_loss). Asking for
one whose package is missing is one line at start-up, before any work (check_trackers).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from diskio import atomic_write

CURVES = "curves.png"  # in out_dir
# (title, [(event, key, label), ...]): a panel is drawn when a run has any of its series
PANELS = (
    ("loss", (("train", "lm_loss", "train"), ("eval", "val_loss", "validation"),
              ("eval", "continuation_loss", "continuation"))),
    ("validation loss per UL2 mode", (("eval", "val_loss_R", "R"), ("eval", "val_loss_X", "X"),
                                      ("eval", "val_loss_S", "S"))),
    ("ROUGE-L", (("eval", "rougeL", "ROUGE-L"), ("eval", "lead1_rougeL", "lead-1 baseline"))),
    ("learning rate", (("train", "lr", "learning rate"),)),
    ("tokens/s", (("train", "tok_per_s", "tokens/s"),)),
)
STYLES = ("-", "--", ":")  # a panel's series, in order; colours tell runs apart
# the packages behind the tracking keys: key -> (module to import, pip package)
TRACKERS = {"wandb_log": ("wandb", "wandb"), "tensorboard_log": ("tensorboard", "tensorboard")}
# the config keys of tracking: where a run's numbers go, never what they are
TRACKING_KEYS = ("wandb_log", "wandb_project", "wandb_run_name", "tensorboard_log")


def read_metrics(run_dir: str) -> list[dict]:
    """The events of a run directory's metrics.jsonl; one line if there is none or a line is not JSON."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist: pass the out_dir of a train.py or finetune.py run")
    events = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                events.append(json.loads(line))
            except ValueError:
                if line.endswith("\n"):  # (a last line without its newline is being written right now)
                    raise SystemExit(f"{path} line {number} is not JSON: delete that line") from None
    return events


def draw(runs: dict[str, list[dict]], path: str) -> None:
    """The curves of runs {label: events} as one PNG at path (written atomically). ImportError without matplotlib."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, nothing to close, no display

    x = "tokens" if all(e.get("tokens") is not None for ev in runs.values() for e in ev
                        if e.get("event") in ("train", "eval")) else "step"
    panels = [(title, series) for title, series in PANELS
              if any(e.get("event") == kind and e.get(key) is not None
                     for ev in runs.values() for e in ev for kind, key, _ in series)]
    if not panels:
        raise ValueError("no train or eval events to draw yet")
    cols = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(6 * cols, 3.4 * rows))
    for i, (title, series) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for colour, (label, events) in enumerate(runs.items()):
            for style, (kind, key, name) in zip(STYLES * 2, series):
                points = [(e[x], e[key]) for e in events if e.get("event") == kind and e.get(key) is not None]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, color=f"C{colour % 10}", marker="." if kind == "eval" else None,
                            label=f"{label}: {name}" if len(runs) > 1 else name)
        if title == "loss" and any(e.get("event") == "eval" for ev in runs.values() for e in ev):
            _zoom(ax, runs)
        ax.set(title=title, xlabel="training tokens" if x == "tokens" else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=80)


def _zoom(ax, runs: dict[str, list[dict]]) -> None:
    """The first evaluation sits near ln(vocabulary) = 10.4 and would flatten the rest: the loss axis shows the
    later points (the first one stays in the data, off the top)."""
    later = [e[k] for ev in runs.values() for e in [e for e in ev if e.get("event") == "eval"][1:]
             for k in ("val_loss", "continuation_loss") if e.get(k) is not None]
    later += [e["lm_loss"] for ev in runs.values() for e in ev if e.get("event") == "train" and e.get("lm_loss")]
    if later:
        low, high = min(later), max(later)
        ax.set_ylim(low - 0.05 * (high - low) - 0.05, high + 0.05 * (high - low) + 0.05)


def check_trackers(config: dict) -> None:
    """Each tracker the config asks for can be imported: else one line, before any work."""
    for key, (module, package) in TRACKERS.items():
        if config.get(key):
            try:
                importlib.import_module(module)
            except ImportError:
                raise SystemExit(f"--{key}=True needs the {package} package: pip install {package} "
                                 f"(or --{key}=False)") from None


class Tracker:
    """What a run does with each event besides appending it to metrics.jsonl (Tracker.log, rank 0 only): send
    its numbers to the trackers the config asks for, and at every evaluation redraw out_dir/curves.png from
    the whole log (so a resumed run's curves hold the steps before the interruption too)."""

    def __init__(self, config: dict, metrics_path: str, say=print):
        self.out_dir, self.metrics_path, self.say = config["out_dir"], metrics_path, say
        self.can_draw, self.wandb, self.tensorboard = True, None, None
        check_trackers(config)
        if config.get("wandb_log"):
            import wandb

            self.wandb = wandb.init(project=config["wandb_project"], name=config["wandb_run_name"] or None,
                                    config=config, dir=self.out_dir)
        if config.get("tensorboard_log"):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))

    def log(self, event: dict) -> None:
        scalars = {f"{event['event']}/{k}": v for k, v in event.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("event", "step")}
        if self.wandb is not None:
            self.wandb.log(scalars, step=event["step"])
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, event["step"])
        if event["event"] == "eval":
            if self.tensorboard is not None:
                self.tensorboard.flush()  # at every evaluation, like the checkpoint
            self.draw()

    def draw(self) -> None:
        if not self.can_draw:
            return
        path = os.path.join(self.out_dir, CURVES)
        try:
            draw({os.path.basename(os.path.normpath(self.out_dir)): read_metrics(self.out_dir)}, path)
        except ImportError:
            self.can_draw = False
            self.say(f"note: matplotlib is not installed, so no {path} (pip install matplotlib); training goes on")
        except (OSError, SystemExit) as e:  # a full disk is the checkpoint's to report; curves are not worth a run
            self.say(f"note: could not draw {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                     "training goes on")

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description="Draw the loss curves of train.py / finetune.py runs, overlaid "
                                             "(their metrics.jsonl).")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="out_dir of a run (several: overlaid)")
    ap.add_argument("--out", default=CURVES, help=f"the PNG to write (default {CURVES} here)")
    a = ap.parse_args(argv)
    labels = [os.path.basename(os.path.normpath(r)) for r in a.runs]
    if len(set(labels)) < len(labels):  # out/x/run and out/y/run: the paths tell them apart
        labels = [os.path.normpath(r) for r in a.runs]
    runs = {label: read_metrics(r) for label, r in zip(labels, a.runs)}
    try:
        draw(runs, a.out)
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib") from None
    except ValueError as e:
        raise SystemExit(f"{', '.join(a.runs)}: {e}") from None
    print(f"wrote {a.out}")
    return a.out


if __name__ == "__main__":
    main(sys.argv[1:])
