"""The end-of-run outputs of scripts/train.py: a JSON log and a loss / accuracy plot (PNG).

Written by process 0 only. The plot uses matplotlib's Agg backend (no display
needed): training loss on a log scale on the left, training and held-out
recall accuracy on the right.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

LOG_FILE = "train_log.json"
PLOT_FILE = "train_curves.png"


def write_log(output_dir: str | pathlib.Path, log: dict[str, Any]) -> pathlib.Path:
  """The run as JSON: config, summary, every logged step and every evaluation."""
  path = pathlib.Path(output_dir) / LOG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(log, indent=1))
  return path


def write_plot(output_dir: str | pathlib.Path, history: list[dict], evals: list[dict],
               title: str) -> pathlib.Path:
  """Loss and accuracy against the step, as PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  path = pathlib.Path(output_dir) / PLOT_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
  steps = [h["step"] for h in history]
  ax_loss.plot(steps, [h["loss"] for h in history], color="tab:blue")
  ax_loss.set_yscale("log")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("loss (answer tokens)")
  ax_loss.grid(alpha=0.3)
  ax_acc.plot(steps, [h["accuracy"] for h in history], label="train batch", color="tab:blue",
              alpha=0.6)
  ax_acc.plot([e["step"] for e in evals], [e["accuracy"] for e in evals], "o-",
              label="held-out", color="tab:orange")
  ax_acc.set_ylim(0, 1.02)
  ax_acc.set_xlabel("step")
  ax_acc.set_ylabel("recall accuracy")
  ax_acc.grid(alpha=0.3)
  ax_acc.legend(loc="lower right")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
