"""PNG charts (matplotlib, no display needed): loss curves, FPS per back-end, confusion matrix,
images per class and split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bit_core.io import atomic_path


def _figure(width: float = 7.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=110)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def plot_loss(curves: Mapping[str, Sequence[dict]], path: Path, title: str = "Training loss"
              ) -> Path:
    """One line per named curve of {"step", "loss"} records; the lr on a second axis if present."""
    plt, fig, ax = _figure()
    for name, records in curves.items():
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    first = next(iter(curves.values()), [])
    if len(curves) == 1 and first and "lr" in first[0]:
        lr_ax = ax.twinx()
        lr_ax.plot([r["step"] for r in first], [r["lr"] for r in first], color="tab:orange",
                   lw=1, alpha=0.7, label="lr")
        lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.legend(loc="upper right")
    ax.set_title(title)
    return _save(plt, fig, path)


def plot_fps(rows: Sequence[dict], path: Path) -> Path:
    """Grouped bars: images/s per batch size, one bar per back-end."""
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    plt, fig, ax = _figure(8, 4)
    width = 0.8 / max(len(backends), 1)
    for i, backend in enumerate(backends):
        fps = {r["batch"]: r["fps"] for r in rows if r["backend"] == backend}
        xs = np.arange(len(batches)) + i * width
        ax.bar(xs, [fps.get(b, 0.0) for b in batches], width, label=backend)
    ax.set_xticks(np.arange(len(batches)) + width * (len(backends) - 1) / 2, map(str, batches))
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Inference throughput")
    return _save(plt, fig, path)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """Row-normalised confusion matrix with counts."""
    size = max(4.0, 0.45 * len(classes) + 2)
    plt, fig, ax = _figure(size, size)
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 30:
        ticks = np.arange(len(classes))
        ax.set_xticks(ticks, classes, rotation=90)
        ax.set_yticks(ticks, classes)
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test)")
    return _save(plt, fig, path)


LABELLED_CLASSES = 40  # up to this many classes the chart names each one


def plot_class_counts(classes: Sequence[str], counts: Mapping[str, Sequence[int]], path: Path
                      ) -> Path:
    """Images per class, one stacked bar per class with a segment per split. Up to
    LABELLED_CLASSES classes are named bars in index order; more are drawn sorted by size,
    unnamed, so the balance of a data set of a thousand classes still shows."""
    totals = np.sum([np.asarray(c) for c in counts.values()], axis=0)
    labelled = len(classes) <= LABELLED_CLASSES
    order = np.arange(len(classes)) if labelled else np.argsort(-totals, kind="stable")
    height = max(3.0, 0.28 * len(classes) + 1.5) if labelled else 4.0
    plt, fig, ax = _figure(7 if labelled else 8, height)
    bar = ax.barh if labelled else ax.bar
    positions, base = np.arange(len(classes)), np.zeros(len(classes))
    for split, values in counts.items():
        values = np.asarray(values)[order]
        if values.any():
            bar(positions, values, 0.8 if labelled else 1.0, base, label=split)
        base += values
    if labelled:
        for y, total in zip(positions, totals[order]):
            ax.text(total, y, f" {total}", va="center", fontsize=8)
        ax.set_yticks(positions, [classes[i] for i in order])
        ax.invert_yaxis()
        ax.set_xlabel("images")
        ax.set_xlim(0, totals.max() * 1.12 or 1)
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.set_xlabel(f"{len(classes)} classes, by number of images")
        ax.set_ylabel("images")
        ax.set_xlim(-0.5, len(classes) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=len(counts), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_title("Images per class and split", pad=24)
    return _save(plt, fig, path)
