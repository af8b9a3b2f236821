"""Training metrics: CSV files anyone can read, TensorBoard for live curves, a PNG at the end."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends rows to ``RUN_DIR/<kind>.csv`` and scalars to TensorBoard under ``RUN_DIR/tb``.

    A row's columns are fixed by the first row written to that file, so a resumed run appends
    to the same files.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        path = self.run_dir / f"{kind}.csv"
        row = {"step": step, **values}
        new = not path.exists()
        with path.open("a", newline="") as f:
            if new:
                csv.writer(f).writerow(row.keys())
                fieldnames = list(row.keys())
            else:
                with path.open() as r:
                    fieldnames = next(csv.reader(r))
            csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore").writerow(row)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_csv(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def plot_learning_curve(run_dir: Path, title: str) -> Path:
    """``RUN_DIR/learning_curve.png``: evaluation mean ± std and training episode returns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = read_csv(run_dir / "episodes.csv")
    evals = read_csv(run_dir / "eval.csv")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if episodes:
        ax.plot(
            [r["step"] for r in episodes],
            [r["return"] for r in episodes],
            color="0.7",
            lw=0.8,
            label="training episodes (with noise)",
        )
    if evals:
        xs = [r["step"] for r in evals]
        mean = [r["return_mean"] for r in evals]
        std = [r["return_std"] for r in evals]
        ax.plot(xs, mean, color="C0", marker="o", ms=3, label="evaluation (deterministic)")
        ax.fill_between(
            xs,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            color="C0",
            alpha=0.2,
        )
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if episodes or evals:
        ax.legend(loc="lower right")
    fig.tight_layout()
    out = run_dir / "learning_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def finite_or_none(x: float) -> Any:
    return x if math.isfinite(x) else None
