"""Plots of a policy comparison (exit layers per question family, accuracy against LM prefill TFLOPs) and of the
paper's findings (`findings.py`: attention stages, withdrawal sweep, attention entropy)."""

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path, dpi: int = 120) -> None:
    """Lay out `figure`, write it to `path` and free it."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    _pyplot().close(figure)


def plot_exit_histograms(results: dict, path: Path) -> None:
    plt = _pyplot()
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
    _save(figure, path)


def plot_pareto(results: dict, path: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.6))
    sweeps = (("static_sweep", "static exit k (VTW)", "s"), ("dynamic_sweep", "dynamic (thresholds)", "o"))
    for key, label, marker in sweeps:
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
    _save(figure, path)


STAGE_PARTS = (("visual_self", "visual self-attention"), ("cross", "cross-attention (text → visual)"),
               ("text_self", "text self-attention"))


def _band(axis, stats: dict, label: str | None = None, style: str = "-", color=None):
    """A per-layer mean line with a ±1 standard deviation band (layers where it is undefined are gaps)."""
    layers = range(len(stats["mean"]))
    mean = [float("nan") if m is None else m for m in stats["mean"]]
    std = [float("nan") if s is None else s for s in stats["std"]]
    (line,) = axis.plot(layers, mean, style, marker=".", label=label, color=color)
    axis.fill_between(layers, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                      alpha=0.2, color=line.get_color())


def _stage_lines(axis, stage: dict):
    """The paper's red lines: between the last layer of one stage and the first of the next."""
    for boundary in stage.get("boundaries") or []:
        axis.axvline(boundary - 0.5, color="red", linestyle="--", linewidth=1)


def plot_attention_stages(results: dict, path: Path, groups: list[str], dpi: int = 120) -> None:
    """One row per group: the attention mass of each part per layer (mean ± std over samples), the stage
    boundaries as red lines, as the paper's Figure 3 draws them."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(groups), len(STAGE_PARTS), figsize=(11, 2.6 * len(groups) + 0.4),
                                squeeze=False, sharex=True)
    for row, group in zip(axes, groups):
        stage = results["stages"][group]
        for axis, (part, title) in zip(row, STAGE_PARTS):
            _band(axis, results["attention"][group][part])
            _stage_lines(axis, stage)
            axis.set_title(title if group == "all" else f"{group}: {title}", fontsize=8)
            axis.grid(alpha=0.3)
        row[0].set_ylabel("attention mass")
    for axis in axes[-1]:
        axis.set_xlabel("layer")
    _save(figure, path, dpi)


def plot_withdrawal(results: dict, path: Path) -> None:
    """Accuracy and agreement with the full model against the withdrawal layer k, per group (Figure 4)."""
    plt = _pyplot()
    figure, (accuracy, agreement) = plt.subplots(1, 2, figsize=(10, 3.6))
    for group, sweep in results["withdrawal"].items():
        ks = [point["k"] for point in sweep["points"]]
        width = 2.2 if group == "all" else 1.0
        (line,) = accuracy.plot(ks, [point["accuracy"] for point in sweep["points"]], marker=".", label=group,
                                linewidth=width)
        agreement.plot(ks, [point["agreement"] for point in sweep["points"]], marker=".", label=group, linewidth=width,
                       color=line.get_color())
        if group == "all":
            accuracy.axhline(sweep["full_model_accuracy"], color="black", linestyle=":", label="full model")
    for axis, label in ((accuracy, "accuracy"), (agreement, "agreement with the full model")):
        axis.set_xlabel("visual tokens withdrawn before layer k")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    accuracy.legend(fontsize=6, ncol=2)
    _save(figure, path)


def plot_entropy(results: dict, path: Path) -> None:
    """Entropy of cross-attention and of text self-attention per layer (mean ± std over all samples), without and
    with the exit policy (Figure 5)."""
    plt = _pyplot()
    entropy = results["entropy"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    titles = (("cross", "cross-attention entropy (samples still holding visual tokens)"),
              ("text_self", "text self-attention entropy"))
    for axis, (name, title) in zip(axes, titles):
        _band(axis, entropy["without"]["all"][name], label="full model", color="tab:blue")
        if "with" in entropy:
            exit_mean = entropy["mean_exit_layer"]["all"]
            _band(axis, entropy["with"]["all"][name], label=f"{entropy['policy']} (mean exit {exit_mean:.2f})",
                  style="--", color="tab:orange")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("layer")
        axis.set_ylabel("entropy (nats)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    _save(figure, path)
