"""The loss-curve PNG written next to every training run."""

from __future__ import annotations

import io
from pathlib import Path

from zolm.utils.io import atomic_write_bytes


def plot_loss(records: list[dict], path: str | Path, title: str = "") -> None:
    """Training loss (raw and moving average) per step, with the dev metric on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if steps:
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
        w = max(1, len(losses) // 20)
        avg = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, avg, color="tab:blue", lw=1.8, label=f"loss (moving avg {w})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    dev = [(r["step"], v) for r in records for k, v in r.items() if k.startswith("dev_") and k != "dev_n"]
    if dev:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in dev], [v for _, v in dev], "o-", color="tab:orange", label="dev metric")
        ax2.set_ylabel("dev metric")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
