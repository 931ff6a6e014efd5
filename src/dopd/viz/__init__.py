"""Pictures of training runs: curves and regime fractions from ``metrics.jsonl``
(``dopd.viz.plots``, needs matplotlib) and a self-contained HTML page of sampled rollouts coloured
token by token by regime (``dopd.viz.tokens``, standard library only).

    from dopd.viz.plots import read_metrics, plot_curves, plot_regimes
    runs = {"dopd": read_metrics("runs/dopd/metrics.jsonl")}
    plot_curves(runs, "curves.png", references={"teacher": 0.62})
    plot_regimes(runs["dopd"], "regimes.png")

Importing this package imports nothing heavy; matplotlib loads when a plot is drawn.
"""
