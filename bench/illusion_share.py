"""The privilege illusion against the share of tokens only the hint determines, on shiftmap.

    python bench/illusion_share.py                      # ~6 min on 2 CPU cores, no downloads
    python bench/illusion_share.py --json /tmp/illusion.json --plot /tmp/illusion.png

The same shipped pair and budget as ``dopd lab`` (one seed), trained with the dense JS objective
over the full vocabulary from the privileged teacher (``js_full``) and from the plain teacher
(``js_full/plain``), each at the rate the tuned main suite chose for it, on tasks whose hint
orders a growing share of the letters at random (``ShiftMap(free_order_share=...)``: 1, 2, 3 and
3 free tokens per solution at 0.25 / 0.5 / 0.75 / 1.0, the last letter of a fully free order
being forced). Prints, per share, both methods' test accuracy, their ratio (privileged / plain)
and the illusion index (the error rate on ``unavailable_info`` tokens), measured in the same run;
writes them as JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from dopd.lab.methods import Method
from dopd.lab.pretrain import lab_model_dir, torch_threads
from dopd.lab.runner import LabSettings, run_method, write_data
from dopd.lab.shiftmap import ShiftMap

SHARES = (0.25, 0.5, 0.75, 1.0)
# The rates the tuned main suite chose (docs/lab-results.md).
METHODS = {
    "js_full": (Method("js_full", "js_full"), 3e-4),
    "js_full/plain": (Method("js_full/plain", "js_full", views={"teacher": "plain"}), 1e-3),
}


def measure(shares: tuple[float, ...], seed: int, work: Path) -> list[dict]:
    settings = LabSettings(seeds=(seed,))
    rows = []
    for share in shares:
        task = ShiftMap(free_order_share=share)
        files = write_data(task, settings, work / f"share{share:g}" / "data", {task.default_hint})
        row = {"free_order_share": share}
        for name, (method, lr) in METHODS.items():
            start = time.perf_counter()
            run = run_method(
                method,
                seed=seed,
                lr=lr,
                settings=settings,
                model_dir=lab_model_dir("shiftmap"),
                files=files,
                output_dir=work / f"share{share:g}" / name.replace("/", "_"),
                task=task,
            )
            row[name] = {
                "accuracy": run.accuracy,
                "illusion_index": 1.0 - run.class_accuracy["unavailable_info"],
                "class_accuracy": run.class_accuracy,
                "wall_seconds": round(time.perf_counter() - start, 1),
            }
            print(f"share {share:g}  {name:14s}  {json.dumps(row[name])}", flush=True)
        plain = row["js_full/plain"]["accuracy"]
        row["accuracy_ratio"] = row["js_full"]["accuracy"] / plain if plain else None
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = [row["free_order_share"] for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in METHODS:
        axes[0].plot(shares, [row[name]["accuracy"] for row in rows], "o-", label=name)
        axes[1].plot(shares, [row[name]["illusion_index"] for row in rows], "o-", label=name)
    axes[0].set(xlabel="free_order_share", ylabel="test accuracy", title="accuracy")
    axes[1].set(xlabel="free_order_share", ylabel="error rate", title="illusion index")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle("shiftmap: privileged vs plain teacher, one seed")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    parser.add_argument("--json", default="docs/bench-illusion-share-cpu.json")
    parser.add_argument("--plot", default="docs/bench-illusion-share-cpu.png")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work, torch_threads(1):
        rows = measure(tuple(args.shares), args.seed, Path(work))
    print(f"{'share':>6}  {'priv acc':>8}  {'plain acc':>9}  {'ratio':>6}  {'priv ill.':>9}")
    for row in rows:
        ratio = row["accuracy_ratio"]
        print(
            f"{row['free_order_share']:>6g}  {row['js_full']['accuracy']:>8.3f}  "
            f"{row['js_full/plain']['accuracy']:>9.3f}  "
            f"{'-' if ratio is None else f'{ratio:.3f}':>6}  "
            f"{row['js_full']['illusion_index']:>9.3f}"
        )
    report = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 1 torch thread, "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        "seed": args.seed,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, Path(args.plot))
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
