"""The GLUE report: ``summary.{json,md,png}`` of the fine-tuning runs under a directory.

``write_summary(root)`` collects every ``results.json`` under ``root`` (written by
``neobert glue`` / ``neobert finetune``, :mod:`neobert.train.glue`), keeps the best run
per task, averages the GLUE tasks' scores (:mod:`neobert.eval.metrics`) and writes the
table of every task and grid point as JSON and Markdown, and a plot of the best score per
task and of score against learning rate for each task with several runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neobert.data.glue import TASK_ORDER
from neobert.eval.metrics import glue_average


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def collect_runs(root: Path) -> list[dict[str, Any]]:
    """Every results.json under ``root`` (a run directory, or a tree of them), with its path."""
    runs = []
    for path in sorted(root.rglob("results.json")):
        result = json.loads(path.read_text())
        result["run_dir"] = str(path.parent.relative_to(root)) or "."
        runs.append(result)
    return runs


def best_per_task(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for run in runs:
        task = run["task"]
        if task not in best or run["score"] > best[task]["score"]:
            best[task] = run
    return {t: best[t] for t in sorted(best, key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER))}


def write_summary(root: Path) -> dict[str, Any]:
    """``summary.json``, ``summary.md`` and ``summary.png`` for the runs under ``root``."""
    runs = collect_runs(root)
    best = best_per_task(runs)
    glue_tasks = {t: r["score"] for t, r in best.items() if t in TASK_ORDER}
    summary = {
        "average": glue_average(glue_tasks),
        "tasks_in_average": list(glue_tasks),
        "missing_tasks": [t for t in TASK_ORDER if t not in glue_tasks],
        "best": {t: {k: r[k] for k in ("score", "metrics", "hyperparameters", "seed", "run_dir", "model")} for t, r in best.items()},
        "runs": runs,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (root / "summary.md").write_text(summary_markdown(summary))
    plot_summary(summary, root / "summary.png")
    return summary


def _hp(run: dict[str, Any]) -> str:
    h = run["hyperparameters"]
    return f"{h['batch_size']} | {h['lr']:g} | {h['weight_decay']:g}"


def summary_markdown(summary: dict[str, Any]) -> str:
    best = summary["best"]
    lines = ["# GLUE results (dev)", "", "Scores x 100. Task score = mean of the task's metrics; average over the tasks run.", ""]
    lines += ["| task | metrics | score | batch | lr | wd | run |", "|---|---|---|---|---|---|---|"]
    for task, r in best.items():
        metrics = ", ".join(f"{k} {pct(v)}" for k, v in r["metrics"].items())
        h = r["hyperparameters"]
        lines.append(f"| {task} | {metrics} | {pct(r['score'])} | {h['batch_size']} | {h['lr']:g} | {h['weight_decay']:g} | {r['run_dir']} |")
    lines.append(f"| **average** | | **{pct(summary['average'])}** | | | | |")
    if summary["missing_tasks"]:
        lines += ["", f"Not run: {', '.join(summary['missing_tasks'])} (the average covers {len(summary['tasks_in_average'])} of 8 tasks)."]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for run in summary["runs"]:
        by_task.setdefault(run["task"], []).append(run)
    for task, runs in by_task.items():
        if len(runs) < 2:
            continue
        lines += ["", f"## {task}: {len(runs)} runs", "", "| batch | lr | wd | seed | score | best step |", "|---|---|---|---|---|---|"]
        for r in sorted(runs, key=lambda r: -r["score"]):
            lines.append(f"| {_hp(r)} | {r['seed']} | {pct(r['score'])} | {r.get('best_step')} |")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Best score per task with the average; per task with several runs, score against LR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task: dict[str, list[dict[str, Any]]] = {}
    for run in summary["runs"]:
        by_task.setdefault(run["task"], []).append(run)
    grids = [t for t in summary["best"] if len(by_task.get(t, [])) > 1]
    fig, axes = plt.subplots(1, 1 + len(grids), figsize=(4.5 * (1 + len(grids)), 3.8), squeeze=False)
    ax = axes[0][0]
    names = [*summary["best"], "average"]
    values = [100 * r["score"] for r in summary["best"].values()] + [100 * (summary["average"] or 0)]
    ax.bar(names, values, color=["C0"] * (len(names) - 1) + ["C3"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("dev score x 100")
    ax.set_title("best run per task")
    ax.tick_params(axis="x", rotation=45)
    for ax, task in zip(axes[0][1:], grids):
        for bs in sorted({r["hyperparameters"]["batch_size"] for r in by_task[task]}):
            points: dict[float, float] = {}
            for r in by_task[task]:
                h = r["hyperparameters"]
                if h["batch_size"] == bs:  # best over weight decays and seeds
                    points[h["lr"]] = max(points.get(h["lr"], -1.0), 100 * r["score"])
            lrs = sorted(points)
            ax.plot(lrs, [points[x] for x in lrs], marker="o", label=f"batch {bs}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
