"""Small matplotlib building blocks shared by the training loggers and the analysis figures."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def head_heatmap(table, title: str = "", vmin: float = 0.0, vmax: float = 1.0):
    """A heads (x) by layers (y) heatmap of a per-head score table [n_layers][n_heads]."""
    n_layers, n_heads = len(table), len(table[0])
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n_heads, 1.0 + 0.6 * n_layers), dpi=100)
    im = ax.imshow(table, vmin=vmin, vmax=vmax, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    for layer in range(n_layers):
        for head in range(n_heads):
            value = table[layer][head]
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > (vmin + vmax) / 2 else "white")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig
