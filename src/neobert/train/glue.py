"""``neobert glue``: GLUE with the paper's protocol, its grid, and the MNLI start of RTE/MRPC/STS-B/QNLI.

``neobert glue TASK|all --model M --data-dir DIR --output-dir OUT [--grid] [CONFIG.yaml]
[key=value ...]`` runs :func:`neobert.train.finetune.run` per task and grid point:

- one task: ``OUT/results.json``, ``OUT/best/`` (the best checkpoint, a Hugging Face
  directory), ``OUT/metrics.jsonl``, ``OUT/config.yaml``;
- ``all``: the same per task in ``OUT/<task>/``;
- ``--grid``: every point of ``glue.grid`` (batch size x LR x weight decay; the paper's
  grid by default) in ``OUT/<task>/bs{B}-lr{LR}-wd{WD}-seed{S}/``; finished points are
  skipped when the command runs again, and only the best point's model is kept.

``all`` and ``--grid`` also write ``OUT/summary.{json,md,png}`` (:mod:`neobert.eval.glue`):
the best run per task, every grid point, and the GLUE average.

``glue.from_mnli``: RTE, MRPC, STS-B and QNLI start from an MNLI model, as in the paper: a
model directory, or ``auto``: the best MNLI run under ``OUT`` (``all`` runs MNLI first;
with ``--grid``, run ``mnli`` into the same ``OUT`` before the others). Without an MNLI
run, ``auto`` starts from the model itself, with a note.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from neobert import rundir
from neobert.cli import ArgumentParser
from neobert.config import load_config, split_args, to_dict
from neobert.data.glue import FROM_MNLI, TASK_ORDER, get_task, load_glue
from neobert.errors import UserError
from neobert.eval.glue import collect_runs, pct, write_summary
from neobert.train import finetune
from neobert.train.finetune import FinetuneConfig


def _fmt(x: float) -> str:
    return f"{x:g}"


def grid_points(cfg: FinetuneConfig) -> list[tuple[int, float, float]]:
    grid = cfg.glue.grid
    points = [(bs, lr, wd) for bs in grid.batch_size for lr in grid.lr for wd in grid.weight_decay]
    if not points:
        raise UserError("glue.grid is empty: give at least one batch_size, lr and weight_decay")
    return points


def _settings(cfg, grid: bool) -> dict[str, Any]:
    """What must stay the same for finished runs under one output directory to be reused."""
    settings = to_dict(cfg)
    # Grid points differ in these (their directory names say which; seeds too).
    for key in ("batch_size", "lr", "weight_decay", "output_dir", *(("seed",) if grid else ())):
        settings["train"].pop(key)
    settings["glue"].pop("task")
    settings["glue"].pop("grid")
    settings.pop("data")
    return settings


def _check_settings(root: Path, cfg, grid: bool) -> None:
    """Refuse to mix runs made with other settings (model, epochs, ...) into one directory."""
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
    if data_dir is None:
        return True
    glue_task = get_task(task)
    folder = Path(data_dir) / glue_task.folder
    return all((folder / f"{split}.tsv").is_file() for split in ("train", *glue_task.dev_splits))


def run_glue(cfg, tasks: list[str], grid: bool) -> list[dict[str, Any]]:
    """Fine-tune and evaluate ``tasks``; see the module docstring for the layout."""
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
            results.append(finetune.run(run_cfg, data, init=init))
            if grid and not cfg.glue.keep_all_models:
                _prune_models(root / task)
    if not single:
        summary = write_summary(root)
        print(f"[glue] average over {len(summary['tasks_in_average'])} task(s): {pct(summary['average'])} -> {root / 'summary.md'}")
    return results


def _with(cfg, **train_fields):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_fields))


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
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
    config_path, overrides = split_args(args.rest)
    for key, value in (("model.name", args.model), ("glue.data_dir", args.data_dir), ("train.output_dir", args.output_dir)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")  # quoted: a path must stay a string
    cfg = load_config(FinetuneConfig, config_path, overrides)
    if not cfg.model.name:
        raise UserError("give --model (a model directory or hub name)")
    tasks = list(TASK_ORDER) if args.task == "all" else [get_task(args.task).name]
    results = run_glue(cfg, tasks, args.grid)
    if len(results) == 1 and len(tasks) == 1 and not args.grid:
        print(json.dumps({k: results[0][k] for k in ("task", "metrics", "score")}))
    return 0
