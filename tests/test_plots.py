"""The benchmarks' plots (benchmarks/plots.py, matplotlib): what a reader needs to read them.

Labelled axes, one legend entry per line (each line its own colour), and the
seeds' spread drawn, on plots made from data shaped as the ablation writes it.
"""

import importlib.util
import pathlib

import matplotlib.colors

ROOT = pathlib.Path(__file__).parent.parent
spec = importlib.util.spec_from_file_location("plots", ROOT / "benchmarks" / "plots.py")
plots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plots)


def test_fig4_has_labelled_axes_and_one_legend_entry_and_colour_per_line(tmp_path):
    rows = [
        dict(step=step, method=method, sampler=sampler, rho_d=rho, relative_l2=0.1 * step * rho)
        for step in (50, 100)
        for method in ("partial", "prmim")
        for sampler in ("random_throw", "furthest")
        for rho in (0.25, 0.5, 0.65)
    ]
    figure = plots.gradient_distance(rows, tmp_path / "fig4.png")
    (axes,) = figure.axes
    assert axes.get_xlabel() == "pretraining step" and "g_MAE" in axes.get_ylabel()
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert len(labels) == len(set(labels)) == len(axes.get_lines()) == 12
    assert "PR-MIM, furthest sampling, rho_d 0.5" in labels
    assert len({matplotlib.colors.to_hex(line.get_color()) for line in axes.get_lines()}) == 12
    assert (tmp_path / "fig4.png").stat().st_size > 0


def test_ablation_plot_shows_each_method_against_rho_d_with_its_spread_and_mae_as_reference(tmp_path):
    results = [dict(method="mae", sampler="random", rho_d=0.0, finetune=(0.90, 0.004, 3), knn=(0.80, 0.01, 3))]
    results += [
        dict(method=method, sampler="furthest", rho_d=rho, finetune=(0.89, 0.005, 3), knn=(0.79, 0.01, 3))
        for method in ("partial", "prmim")
        for rho in (0.25, 0.5, 0.65)
    ]
    figure = plots.ablation(results, tmp_path / "table2.png", {"finetune": "fine-tune", "knn": "kNN"})
    assert len(figure.axes) == 2
    for axes, metric in zip(figure.axes, ("fine-tune", "kNN"), strict=True):
        assert axes.get_xlabel().startswith("rho_d") and axes.get_ylabel() == f"{metric} top-1 (%)"
        labels = [text.get_text() for text in axes.get_legend().get_texts()]
        assert labels == [
            "MAE (3 seeds)",
            "partial reconstruction, furthest sampling",
            "PR-MIM, furthest sampling",
        ]
        assert len(axes.containers) == 2  # one error-bar series per method, three points each
        assert all(len(container.lines[0].get_xdata()) == 3 for container in axes.containers)
