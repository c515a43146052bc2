"""The benchmarks' plots, drawn with matplotlib (no display needed: the Agg backend).

- ``gradient_distance``: the paper's Fig. 4, the relative distance of a method's
  gradient to MAE's along pretraining, one line per (method, sampler, rho_d).
- ``ablation``: Table 2 as a picture, top-1 against rho_d for partial
  reconstruction and PR-MIM (one line per method and sampler, the seeds' spread
  as error bars), MAE as a horizontal band; one panel per metric.

Each returns the ``Figure`` (the tests read its axes and legends) after saving it.
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after choosing the backend

METHOD_NAMES = {"mae": "MAE", "partial": "partial reconstruction", "prmim": "PR-MIM"}


def series_label(method: str, sampler: str, rho_d: float | None = None) -> str:
    label = f"{METHOD_NAMES.get(method, method)}, {sampler} sampling"
    return label if rho_d is None else f"{label}, rho_d {rho_d:g}"


def gradient_distance(rows: list[dict], path: pathlib.Path, title: str = "") -> plt.Figure:
    """Fig. 4: ``rows`` of ``{step, method, sampler, rho_d, relative_l2}``; one line per series, steps on x."""
    series: dict[tuple, list[tuple[int, float]]] = {}
    for row in rows:
        series.setdefault((row["method"], row["sampler"], row["rho_d"]), []).append((row["step"], row["relative_l2"]))
    figure, axes = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: each line its own
    ordered = sorted(series.items(), key=lambda item: (item[0][2], item[0][0], item[0][1]))
    for colour, ((method, sampler, rho_d), points) in zip(colours * 2, ordered, strict=False):
        steps, values = zip(*sorted(points), strict=True)
        axes.plot(
            steps,
            values,
            color=colour,
            marker="o" if method == "prmim" else "s",
            linestyle="-" if method == "prmim" else "--",
            linewidth=2 if sampler == "furthest" else 1,
            label=series_label(method, sampler, rho_d),
        )
    axes.set_xlabel("pretraining step")
    axes.set_ylabel("||g - g_MAE|| / ||g_MAE||")
    axes.set_ylim(bottom=0)
    axes.set_title(title or "Gradient distance to MAE along pretraining (Fig. 4)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.savefig(path, dpi=120)
    return figure


def ablation(results: list[dict], path: pathlib.Path, metrics: dict[str, str], title: str = "") -> plt.Figure:
    """Table 2: ``results`` rows ``{method, sampler, rho_d, <metric>: (mean, spread, n)}`` (fractions); one
    panel per ``metrics`` key (``{key: axis label}``), top-1 in % against rho_d, MAE's mean +- spread as a band.
    """
    figure, panels = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for axes, (metric, label) in zip(panels[0], metrics.items(), strict=True):
        mae = next((row for row in results if row["method"] == "mae" and row.get(metric)), None)
        if mae and mae[metric][0] is not None:
            mean, spread, n = mae[metric]
            axes.axhline(100 * mean, color="black", linewidth=1, label=f"MAE ({n} seeds)")
            axes.axhspan(100 * (mean - spread), 100 * (mean + spread), color="black", alpha=0.1)
        series: dict[tuple, list[tuple]] = {}
        for row in results:
            if row["method"] != "mae" and row.get(metric) and row[metric][0] is not None:
                series.setdefault((row["method"], row["sampler"]), []).append((row["rho_d"], *row[metric]))
        for i, ((method, sampler), points) in enumerate(sorted(series.items())):
            rho, mean, spread, _ = zip(*sorted(points), strict=True)
            dodge = 0.006 * (i - (len(series) - 1) / 2)  # side by side, so that the error bars stay readable
            axes.errorbar(
                [value + dodge for value in rho],
                [100 * value for value in mean],
                yerr=[100 * value for value in spread],
                marker="o",
                capsize=3,
                linestyle="-" if method == "prmim" else "--",
                label=series_label(method, sampler),
            )
        axes.set_xlabel("rho_d (fraction of all tokens thrown)")
        axes.set_ylabel(f"{label} top-1 (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(title or "Partial reconstruction and PR-MIM against MAE (Table 2)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure
