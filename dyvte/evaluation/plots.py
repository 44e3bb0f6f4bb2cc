"""Plots of a policy comparison: exit layers per question family, and accuracy against LM prefill TFLOPs."""

from pathlib import Path


def plot_exit_histograms(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policy = next((p for p in ("dynamic", "fastv+dynamic") if p in results["exit_layers"]), None)
    if policy is None:
        return
    exits, families = results["exit_layers"][policy], results["families"]
    names = sorted(set(families))
    figure, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 2.4), sharey=True, squeeze=False)
    top = max(exits)
    for axis, family in zip(axes[0], names):
        values = [e for e, f in zip(exits, families) if f == family]
        axis.hist(values, bins=range(0, top + 2), align="left", rwidth=0.85)
        axis.set_title(family or "all", fontsize=8)
        axis.set_xlabel("exit layer", fontsize=8)
    axes[0][0].set_ylabel("samples")
    figure.suptitle(f"exit layers ({policy})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_pareto(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.6))
    for key, label, marker in (("static_sweep", "static exit k (VTW)", "s"), ("dynamic_sweep", "dynamic (thresholds)", "o")):
        points = sorted(results.get(key, []), key=lambda p: p["lm_tflops"])
        if points:
            axis.plot([p["lm_tflops"] for p in points], [p["accuracy"] for p in points], marker=marker, label=label)
    for name, metrics in results["policies"].items():
        axis.scatter(metrics["lm_tflops"], metrics["accuracy"], marker="*", s=90, zorder=3)
        axis.annotate(name, (metrics["lm_tflops"], metrics["accuracy"]), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
    axis.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))  # readable at testbed and 7B scales
    axis.set_xlabel("LM prefill TFLOPs per sample")
    axis.set_ylabel("accuracy")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
