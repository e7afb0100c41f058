"""The accuracy-against-compression plot: one line per method, one panel per task plus the average."""

from __future__ import annotations

from pathlib import Path

# Stable colours and markers so the same method looks the same in every build's plot.
STYLE = {
    "vanilla": ("black", "*"),
    "dms": ("tab:green", "o"),
    "window": ("tab:blue", "s"),
    "h2o": ("tab:orange", "^"),
    "tova": ("tab:red", "v"),
    "kvzip": ("tab:purple", "D"),
}


def plot_accuracy_vs_cr(
    accuracy: dict[str, dict[str, dict[str, float]]],
    measured_cr: dict[str, dict[str, dict[str, float]]],
    path: Path,
    title: str,
) -> Path:
    """Write a PNG of accuracy (points) against measured compression ratio.

    accuracy / measured_cr: {method: {cr_label: {task: value}}} (report shape, "average" included).
    Vanilla (one point at CR 1) is drawn as a horizontal reference line so every panel shows it.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = sorted({t for per_cr in accuracy.values() for accs in per_cr.values() for t in accs})
    tasks = [t for t in tasks if t != "average"] + (["average"] if "average" in tasks else [])
    if not tasks:
        raise ValueError("nothing to plot: the accuracy table is empty")
    cols = min(len(tasks), 2 if len(tasks) <= 4 else 3)
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        # Legend in a fixed order (vanilla, dms, baselines); DMS drawn on top where lines overlap.
        order = [m for m in STYLE if m in accuracy] + [m for m in accuracy if m not in STYLE]
        for method in order:
            per_cr = accuracy[method]
            color, marker = STYLE.get(method, ("tab:gray", "x"))
            points = sorted(
                (measured_cr[method][label].get(task, float(label)), accs[task])
                for label, accs in per_cr.items()
                if task in accs
            )
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            if method == "vanilla":
                ax.axhline(ys[0], color=color, linestyle="--", linewidth=1, label="vanilla (CR 1)")
                ax.plot(xs, ys, marker=marker, color=color, linestyle="none", markersize=9)
            else:
                ax.plot(xs, ys, marker=marker, color=color, label=method, zorder=3 if method == "dms" else 2)
        ax.set_title(task)
        ax.set_xscale("log", base=2)
        ax.set_xlim(0.85, max(ax.get_xlim()[1], 9.5))  # always show the CR-8 target on the axis
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("measured compression ratio (KV kept, x)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-3, 103)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
