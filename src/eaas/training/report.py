"""The training report's picture: loss curves and per-layer expert load."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Write a PNG: train / held-out loss against step, and each layer's share of tokens per expert.

    Args:
        report: :func:`eaas.training.trainer.report_dict` output.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["curve"]
    loads = report["expert_load"]
    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_loss.plot([p["step"] for p in curve], [p["train_loss"] for p in curve], lw=0.6, color="0.6", label="train (per step)")
    held = [p for p in curve if "held_out_loss" in p]
    ax_loss.plot([p["step"] for p in held], [p["held_out_loss"] for p in held], "o-", color="C3", label="held-out")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats / token)")
    ax_loss.set_title(f"held-out loss {report['held_out_loss']:.3f} (perplexity {report['held_out_perplexity']:.1f})")
    ax_loss.legend()
    width = 0.8 / max(1, len(loads))
    for i, layer in enumerate(loads):
        total = sum(layer["counts"]) or 1
        xs = [e + i * width for e in range(len(layer["counts"]))]
        ax_load.bar(xs, [c / total for c in layer["counts"]], width=width,
                    label=f"layer {layer['layer']}: hottest {layer['hottest_fraction']:.2f}, Gini {layer['gini']:.2f}")
    if loads:
        n = len(loads[0]["counts"])
        ax_load.axhline(1 / n, color="0.3", ls=":", lw=1, label="uniform")
        ax_load.set_xticks([e + 0.4 - width / 2 for e in range(n)], [str(e) for e in range(n)])
    ax_load.set_xlabel("expert")
    ax_load.set_ylabel("share of held-out token assignments")
    ax_load.set_title("expert load on held-out text")
    ax_load.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
