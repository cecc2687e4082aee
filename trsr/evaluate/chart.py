"""report/<split>.png: Recall@K and MRR@K per method with their intervals, one colour
family per method family (LLM blues, sequential greens, CTR oranges, trivial greys), so
no two methods share a colour however many there are."""

from __future__ import annotations

import io

import numpy as np

from trsr import storage
from trsr.evaluate.examples import FAMILIES

# A colour map per family; methods of one family take evenly spaced shades of it.
FAMILY_COLOURS = {"llm": "Blues", "sequential": "Greens", "ctr": "Oranges", "trivial": "Greys", "other": "Purples"}


def method_colours(families: dict[str, str]) -> dict[str, tuple]:
    """A distinct RGBA colour per method: its family's map, shades 0.45-0.95."""
    import matplotlib

    colours = {}
    for family in FAMILIES:
        members = [m for m, f in families.items() if f == family]
        cmap = matplotlib.colormaps[FAMILY_COLOURS[family]]
        for i, method in enumerate(members):
            colours[method] = cmap(0.95 - 0.5 * i / max(1, len(members) - 1) if len(members) > 1 else 0.75)
    for method in families:  # a family outside FAMILIES
        colours.setdefault(method, matplotlib.colormaps["Purples"](0.75))
    return colours


def write_chart(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"recall@{k}" for k in result["ks"]] + [f"mrr@{k}" for k in result["ks"]]
    methods = list(result["methods"])
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names) + 0.3 * len(methods)), 4))
    colours = method_colours({m: result["methods"][m].get("family", "other") for m in methods})
    for i, method in enumerate(methods):
        row = result["methods"][method]
        values = np.array([row["metrics"][n] for n in names])
        lows = np.array([row["intervals"][n][0] for n in names])
        highs = np.array([row["intervals"][n][1] for n in names])
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=method, color=colours[method],
               yerr=[values - lows, highs - values], capsize=2)
    if result["chance"]:
        for j, n in enumerate(names):
            ax.hlines(result["chance"][n], j - 0.45, j + 0.45, colors="black", linestyles="dashed",
                      label="chance" if j == 0 else None)
    ax.set_xticks(x, [n.replace("recall", "Recall").replace("mrr", "MRR") for n in names])
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['split']}: {result['lists']} lists, {round(result['confidence'] * 100)}% intervals")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    with storage.open_binary(path, "wb") as handle:
        handle.write(buffer.getvalue())
