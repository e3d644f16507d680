"""GLUE metrics and scores, the paper's grid, and the ``neobert glue`` command.

Metrics (scikit-learn / scipy; all in [0, 1] or [-1, 1], tables show them x 100):
``accuracy``; ``f1`` (binary: of class 1, as GLUE's MRPC/QQP; token classification with
BIO tags: entity-level, CoNLL style); ``f1_macro``; ``matthews`` (CoLA); ``pearson`` and
``spearman`` (STS-B). MNLI reports ``accuracy_matched`` and ``accuracy_mismatched``.

Scores follow GLUE's official averaging: a task's score is the mean of its metrics (MRPC
and QQP: F1 and accuracy; STS-B: Pearson and Spearman; MNLI: matched and mismatched),
and the GLUE score is the mean of the task scores (here over the eight tasks, no WNLI).
The same task score selects the best checkpoint and the best grid point.

``neobert glue TASK|all --model M --data-dir DIR --output-dir OUT [--grid] [CONFIG.yaml]
[key=value ...]``:

- one task: ``OUT/results.json``, ``OUT/best/`` (the best checkpoint, a Hugging Face
  directory), ``OUT/metrics.jsonl``, ``OUT/config.yaml``;
- ``all``: the same per task in ``OUT/<task>/``;
- ``--grid``: every point of ``glue.grid`` (batch size x LR x weight decay; the paper's
  grid by default) in ``OUT/<task>/bs{B}-lr{LR}-wd{WD}-seed{S}/``; finished points are
  skipped when the command runs again, and only the best point's model is kept.

``all`` and ``--grid`` also write ``OUT/summary.{json,md,png}``: the best run per task,
every grid point, and the GLUE average.

``glue.from_mnli``: RTE, MRPC, STS-B and QNLI start from an MNLI model, as in the paper: a
model directory, or ``auto``: the best MNLI run under ``OUT`` (``all`` runs MNLI first;
with ``--grid``, run ``mnli`` into the same ``OUT`` before the others). Without an MNLI
run, ``auto`` starts from the model itself, with a note.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from neobert import rundir
from neobert.errors import UserError

# The paper's table order; MNLI first, so the tasks that may start from it come after.
TASK_ORDER = ("mnli", "qnli", "qqp", "rte", "sst2", "mrpc", "cola", "stsb")
FROM_MNLI = ("rte", "mrpc", "stsb", "qnli")  # tasks the paper starts from the best MNLI model


# ---------------------------------------------------------------------------------------
# Metrics


def bio_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Entities (type, start, end) of a BIO tag sequence; an ``I-`` without a ``B-`` starts one."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        inside = tag.startswith("I-") and kind == tag[2:]
        if start is not None and not inside:
            spans.add((kind, start, i))
            start, kind = None, None
        if tag[:2] in ("B-", "I-") and not inside:
            start, kind = i, tag[2:]
    return spans


def entity_f1(pred_tags: list[list[str]], gold_tags: list[list[str]]) -> float:
    """Micro F1 over exact entity spans (CoNLL-2003's measure)."""
    tp = n_pred = n_gold = 0
    for p, g in zip(pred_tags, gold_tags):
        ps, gs = bio_spans(p), bio_spans(g)
        tp += len(ps & gs)
        n_pred += len(ps)
        n_gold += len(gs)
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0


def _correlation(fn, p: np.ndarray, y: np.ndarray) -> float:
    # Undefined for a constant input (NaN, with a warning): score it 0 like Matthews does,
    # so model selection never compares against NaN.
    if len(y) < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(fn(p, y)[0])


METRICS = {
    "accuracy": lambda p, y: float(np.mean(p == y)),
    "f1": lambda p, y: float(f1_score(y, p, zero_division=0)),
    "f1_macro": lambda p, y: float(f1_score(y, p, average="macro", zero_division=0)),
    "matthews": lambda p, y: float(matthews_corrcoef(y, p)),
    "pearson": lambda p, y: _correlation(pearsonr, p, y),
    "spearman": lambda p, y: _correlation(spearmanr, p, y),
}


def compute_metrics(
    names: tuple[str, ...] | list[str], outputs: np.ndarray, labels: np.ndarray, kind: str, label_names: list[str] | None = None
) -> dict[str, float]:
    """Metrics from model outputs: logits (B, C) / scores (B, 1) / token logits (B, L, C).

    Token classification scores the positions whose label is not -100 (each word's first
    sub-word); ``f1`` there is entity-level over the BIO tags in ``label_names``.
    """
    outputs, labels = np.asarray(outputs), np.asarray(labels)
    if kind == "regression":
        preds = outputs.reshape(len(outputs), -1)[:, 0].astype(np.float64)
        return {n: METRICS[n](preds, labels.astype(np.float64)) for n in names}
    preds = outputs.argmax(-1)
    if kind != "token_classification":
        return {n: METRICS[n](preds, labels) for n in names}
    keep = labels != -100
    result = {n: METRICS[n](preds[keep], labels[keep]) for n in names if n != "f1"}
    if "f1" in names:
        tag = np.asarray(label_names)
        result["f1"] = entity_f1([list(tag[p[k]]) for p, k in zip(preds, keep)], [list(tag[y[k]]) for y, k in zip(labels, keep)])
    return {n: result[n] for n in names}


def task_score(metrics: dict[str, float]) -> float:
    """GLUE's task score: the mean of the task's metrics."""
    return float(np.mean(list(metrics.values())))


def glue_average(scores: dict[str, float]) -> float | None:
    """The GLUE score: the mean of the task scores; None without any."""
    return float(np.mean(list(scores.values()))) if scores else None


# ---------------------------------------------------------------------------------------
# Reports


def _pct(x: float | None) -> str:
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
        metrics = ", ".join(f"{k} {_pct(v)}" for k, v in r["metrics"].items())
        h = r["hyperparameters"]
        lines.append(f"| {task} | {metrics} | {_pct(r['score'])} | {h['batch_size']} | {h['lr']:g} | {h['weight_decay']:g} | {r['run_dir']} |")
    lines.append(f"| **average** | | **{_pct(summary['average'])}** | | | | |")
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
            lines.append(f"| {_hp(r)} | {r['seed']} | {_pct(r['score'])} | {r.get('best_step')} |")
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


# ---------------------------------------------------------------------------------------
# The command


def _fmt(x: float) -> str:
    return f"{x:g}"


def grid_points(cfg) -> list[tuple[int, float, float]]:
    g = cfg.glue.grid
    points = [(bs, lr, wd) for bs in g.batch_size for lr in g.lr for wd in g.weight_decay]
    if not points:
        raise UserError("glue.grid is empty: give at least one batch_size, lr and weight_decay")
    return points


def _settings(cfg, grid: bool) -> dict[str, Any]:
    """What must stay the same for finished runs under one output directory to be reused."""
    from neobert.config import to_dict

    d = to_dict(cfg)
    # Grid points differ in these (their directory names say which; seeds too).
    for key in ("batch_size", "lr", "weight_decay", "output_dir", *(("seed",) if grid else ())):
        d["train"].pop(key)
    d["glue"].pop("task")
    d["glue"].pop("grid")
    d.pop("data")
    return d


def _check_settings(root: Path, cfg, grid: bool) -> None:
    """Refuse to mix runs made with other settings (model, epochs, ...) into one directory."""
    import yaml

    path = root / "glue-settings.yaml"
    settings = _settings(cfg, grid)
    if path.exists():
        before = yaml.safe_load(path.read_text())
        if before != settings:
            diff = sorted(
                f"{s}.{k}" for s in settings for k in settings[s] if (before.get(s) or {}).get(k) != settings[s][k]
            )
            raise UserError(f"{root} holds runs made with other settings ({', '.join(diff)}); use another --output-dir")
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, sort_keys=True))


def _mnli_model(root: Path, option: str) -> str | None:
    """The model RTE/MRPC/STS-B/QNLI start from: a path, or ``auto``: the best MNLI run under
    ``root`` if there is one (None otherwise: they start from the model itself)."""
    if option != "auto":
        if not Path(option).is_dir():
            raise UserError(f"glue.from_mnli: no model directory at {option}")
        return option
    runs = collect_runs(root / "mnli") if (root / "mnli").is_dir() else []
    runs = [r for r in runs if (root / "mnli" / r["run_dir"] / "best").is_dir()]
    if not runs:
        print(f"[glue] glue.from_mnli=auto: no MNLI run under {root / 'mnli'}; starting from the model itself", file=sys.stderr)
        return None
    return str(root / "mnli" / max(runs, key=lambda r: r["score"])["run_dir"] / "best")


def _prune_models(task_dir: Path) -> None:
    """Keep only the best grid point's model: a full grid of NeoBERT-base models would fill a disk."""
    runs = collect_runs(task_dir)
    if runs:
        keep = max(runs, key=lambda r: r["score"])["run_dir"]
        for r in runs:
            if r["run_dir"] != keep:
                rundir.safe_rmtree(task_dir / r["run_dir"] / "best")


def glue_available(task: str, data_dir: str | None) -> bool:
    """Whether the train and dev files of ``task`` are in ``data_dir`` (always True for the hub)."""
    from neobert.data.glue import get_task

    if data_dir is None:
        return True
    t = get_task(task)
    folder = Path(data_dir) / t.folder
    return all((folder / f"{s}.tsv").is_file() for s in ("train", *t.dev_splits))


def run_glue(cfg, tasks: list[str], grid: bool) -> list[dict[str, Any]]:
    """Fine-tune and evaluate ``tasks``; see the module docstring for the layout."""
    from neobert.data.glue import load_glue
    from neobert.train.finetune import run  # here: finetune imports this module's metrics

    root = Path(cfg.train.output_dir)
    single = len(tasks) == 1 and not grid
    if not single:
        _check_settings(root, cfg, grid)
    points = grid_points(cfg) if grid else [(cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay)]
    results = []
    for task in tasks:
        if not single and not glue_available(task, cfg.glue.data_dir):
            print(f"[glue] {task}: no train/dev files under {cfg.glue.data_dir}; skipped", file=sys.stderr)
            continue
        # One run writes straight into OUT, so `auto` has no OUT/mnli to look in: the model itself.
        use_mnli = cfg.glue.from_mnli and task in FROM_MNLI and not (single and cfg.glue.from_mnli == "auto")
        init = _mnli_model(root, cfg.glue.from_mnli) if use_mnli else None
        data = load_glue(task, cfg.glue.data_dir)
        for bs, lr, wd in points:
            if single:
                run_dir = root
            elif grid:
                run_dir = root / task / f"bs{bs}-lr{_fmt(lr)}-wd{_fmt(wd)}-seed{cfg.train.seed}"
            else:
                run_dir = root / task
            if not single and (run_dir / "results.json").is_file():
                print(f"[glue] {task} {run_dir.name}: finished before; skipped", file=sys.stderr)
                continue
            run_cfg = _with(cfg, output_dir=str(run_dir), batch_size=bs, lr=lr, weight_decay=wd)
            print(f"[glue] {task}: batch {bs}, lr {lr:g}, wd {wd:g} -> {run_dir}", file=sys.stderr)
            results.append(run(run_cfg, data, init=init))
            if grid and not cfg.glue.keep_all_models:
                _prune_models(root / task)
    if not single:
        summary = write_summary(root)
        print(f"[glue] average over {len(summary['tasks_in_average'])} task(s): {_pct(summary['average'])} -> {root / 'summary.md'}")
    return results


def _with(cfg, **train_fields):
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_fields))


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def main(argv: list[str]) -> int:
    from neobert.config import load_config
    from neobert.train.finetune import FinetuneConfig

    parser = _ArgumentParser(
        prog="neobert glue",
        description="Fine-tune and evaluate on GLUE with the paper's protocol.",
        epilog="Overrides: train.lr=3e-5 train.epochs=3 train.batch_size=32 train.max_length=128 train.seed=0 "
        "glue.grid.lr=[1e-5,2e-5] glue.from_mnli=auto ...",
    )
    parser.add_argument("task", help=f"one of {' '.join(TASK_ORDER)}, or all")
    parser.add_argument("--model", help="model directory or hub name (any AutoModelForSequenceClassification)")
    parser.add_argument("--data-dir", help="GLUE's TSV files (DIR/SST-2/train.tsv, ...); without it, the hub")
    parser.add_argument("--output-dir", help="where runs, results.json and summaries go")
    parser.add_argument("--grid", action="store_true", help="run the grid glue.grid (the paper's by default); resumable")
    parser.add_argument("rest", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    args = parser.parse_intermixed_args(argv)
    configs = [a for a in args.rest if "=" not in a]
    if len(configs) > 1:
        raise UserError(f"unexpected arguments {configs[1:]}: expected one CONFIG.yaml and key=value overrides")
    overrides = [a for a in args.rest if "=" in a]
    for key, value in (("model.name", args.model), ("glue.data_dir", args.data_dir), ("train.output_dir", args.output_dir)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")  # quoted: a path must stay a string
    cfg = load_config(FinetuneConfig, configs[0] if configs else None, overrides)
    if not cfg.model.name:
        raise UserError("give --model (a model directory or hub name)")
    from neobert.data.glue import get_task

    tasks = list(TASK_ORDER) if args.task == "all" else [get_task(args.task).name]
    results = run_glue(cfg, tasks, args.grid)
    if len(results) == 1 and len(tasks) == 1 and not args.grid:
        r = results[0]
        print(json.dumps({"task": r["task"], "metrics": r["metrics"], "score": r["score"]}))
    return 0
