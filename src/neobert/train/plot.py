"""``neobert plot RUN_DIR``: PNG curves of a run's metrics.jsonl.

Writes ``RUN_DIR/curves.png``: training and held-out loss, held-out masked-token
accuracy, learning rate and tokens/s against the step.
"""

from __future__ import annotations

from pathlib import Path

from neobert.cli import ArgumentParser


def plot_run(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neobert.train.loop import read_metrics

    records = read_metrics(run_dir)

    def series(key):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.plot(*series("loss"), label="train", lw=1)
    ax.plot(*series("eval_loss"), "o-", label="held-out", ms=3)
    ax.set(title="MLM loss", xlabel="step")
    ax.legend()
    ax = axes[0, 1]
    steps, acc = series("eval_accuracy")
    ax.plot(steps, [100 * a for a in acc], "o-", ms=3)
    ax.set(title="held-out masked-token accuracy (%)", xlabel="step")
    axes[1, 0].plot(*series("lr"))
    axes[1, 0].set(title="learning rate", xlabel="step")
    axes[1, 1].plot(*series("tokens_per_s"))
    axes[1, 1].set(title="tokens/s", xlabel="step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="neobert plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    print(plot_run(parser.parse_args(argv).run_dir))
    return 0
