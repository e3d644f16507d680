"""GLUE and fine-tuning: loaders on the real file formats, metrics against hand-checked
values, training behaviour (loss, early stopping), the grid's resume, outputs and errors.

Models are tiny NeoBERTs with NeoBERT's default tokenizer; data are a few rows in tmp.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from neobert import NeoBERTConfig, NeoBERTForMaskedLM, load_tokenizer
from neobert.cli import main as cli
from neobert.config import load_config
from neobert.data.glue import TASKS, load_glue, load_labelled, read_glue_tsv
from neobert.errors import UserError
from neobert.eval.metrics import bio_spans, compute_metrics, entity_f1, glue_average, task_score
from neobert.train import finetune
from neobert.train.finetune import FinetuneConfig, featurize, run

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# A few rows of every task in GLUE's own layout: CoLA without a header and without a final
# newline, MRPC with a byte-order mark and an unbalanced quote, QQP with a broken row.
GLUE_FILES = {
    "CoLA/train.tsv": "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n",
    "CoLA/dev.tsv": "gj04\t1\t\tThe sailors rode the breeze.\nclc95\t0\t*\tThe more books I ask to whom.",
    "SST-2/train.tsv": "sentence\tlabel\nhide new secretions \t0\nthe greatest musicians \t1\n",
    "SST-2/dev.tsv": "sentence\tlabel\nit 's a charming journey . \t1\nunflinchingly bleak \t0\n",
    "MRPC/train.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    "1\t702876\t702977\tAmrozi accused his brother.\tReferring to him, Amrozi accused his brother.\n"
    "0\t2108705\t2108831\tYucaipa owned Dominick's.\tYucaipa bought Dominick's in 1995.\n",
    "MRPC/dev.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    "1\t1355540\t1355592\tHe said the pie business doesn't fit.\t\"The pie business does not fit.\n",
    "STS-B/train.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n"
    "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a large flute.\tA man is playing a flute.\t3.800\n",
    "STS-B/dev.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man is dancing.\tA man wearing a hat is dancing.\t4.250\n",
    "QQP/train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of prepration is enough?\t0\n"
    "402555\t536040\t536041\tHow do I control my horny emotions?\tHow do you control your horniness?\t1\n"
    "363362\t19184\tHow do I get rid of a cold?\n",
    "QQP/dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    "1\t2\t3\tWhy are people so rude?\tWhy are people rude?\t1\n",
    "MNLI/train.tsv": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
    "sentence1\tsentence2\tlabel1\tgold_label\n"
    "0\t31193\t31193n\tgovernment\t( ( x ) )\t( ( y ) )\t(ROOT x)\t(ROOT y)\tConceptually cream skimming has two dimensions.\t"
    "Product and geography are what make cream skimming work. \tneutral\tneutral\n"
    "1\t101457\t101457e\ttelephone\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tyou know during the season\tYou lose the things.\tentailment\tentailment\n",
    **{
        f"MNLI/{split}.tsv": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
        "sentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
        f"0\t63735\t63735n\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{text}\tThe new rights are nice enough\t"
        "neutral\tentailment\tneutral\tneutral\tneutral\tcontradiction\n"
        for split, text in (("dev_matched", "The new rights are nice."), ("dev_mismatched", "Your contribution helped."))
    },
    "QNLI/train.tsv": "index\tquestion\tsentence\tlabel\n0\tWhen did it end?\tIt ended in 1997.\tentailment\n",
    "QNLI/dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWhat came into force?\tThe new constitution came into force.\tnot_entailment\n",
    "RTE/train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tNo Weapons Found in Iraq Yet.\tWeapons Found in Iraq.\tnot_entailment\n",
    "RTE/dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tDana Reeve has died.\tChristopher Reeve had an accident.\tnot_entailment\n",
}

# (task, train rows, first train row, dev split -> rows)
EXPECTED = {
    "cola": (2, {"text_a": "Our friends won't buy this analysis.", "label": 1}, {"dev": 2}),
    "sst2": (2, {"text_a": "hide new secretions ", "label": 0}, {"dev": 2}),
    "mrpc": (2, {"text_a": "Amrozi accused his brother.", "text_b": "Referring to him, Amrozi accused his brother.", "label": 1}, {"dev": 1}),
    "stsb": (2, {"text_a": "A plane is taking off.", "text_b": "An air plane is taking off.", "label": 5.0}, {"dev": 1}),
    "qqp": (2, {"text_a": "How is the life of a math student?", "text_b": "Which level of prepration is enough?", "label": 0}, {"dev": 1}),
    "mnli": (2, {"text_a": "Conceptually cream skimming has two dimensions.", "text_b": "Product and geography are what make cream skimming work. ", "label": 1},
             {"matched": 1, "mismatched": 1}),
    "qnli": (1, {"text_a": "When did it end?", "text_b": "It ended in 1997.", "label": 0}, {"dev": 1}),
    "rte": (1, {"text_a": "No Weapons Found in Iraq Yet.", "text_b": "Weapons Found in Iraq.", "label": 1}, {"dev": 1}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_glue(root: Path, files: dict[str, str] = GLUE_FILES) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def glue_dir(tmp_path) -> Path:
    return write_glue(tmp_path / "glue")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random NeoBERT directory without tokenizer files: the default one applies."""
    torch.manual_seed(0)
    config = NeoBERTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_length=64)
    path = tmp_path_factory.mktemp("tiny-neobert")
    NeoBERTForMaskedLM(config).save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """A task a tiny model learns in a few dozen steps: the first word gives the label."""
    rng = np.random.default_rng(seed)
    words = ["movie", "plot", "actor", "scene", "music", "story", "film", "cast"]
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(2))
        texts.append(" ".join([("great" if label else "awful"), *rng.choice(words, 4)]))
        labels.append(label)
    return texts, labels


def write_sst2(root: Path, n_train: int = 64, n_dev: int = 32) -> Path:
    for split, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
        texts, labels = sentiment_rows(n, seed)
        (root / "SST-2").mkdir(parents=True, exist_ok=True)
        rows = "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels))
        (root / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    return root


def tiny_cfg(model: Path, out: Path, *overrides: str) -> FinetuneConfig:
    return load_config(
        FinetuneConfig,
        None,
        [f"model.name={model}", f"train.output_dir={out}", "train.batch_size=8", "train.eval_batch_size=32", "train.bf16=false",
         "train.max_length=128", *overrides],
    )


# ---------------------------------------------------------------------------------------
# Loaders


@pytest.mark.parametrize("task", list(EXPECTED))
def test_each_glue_loader_reads_the_original_tsv_layout(glue_dir, task):
    n_train, first, evals = EXPECTED[task]
    data = load_glue(task, glue_dir)
    assert len(data.train) == n_train
    assert data.train[0] == first
    assert {k: len(v) for k, v in data.evals.items()} == evals
    assert data.kind == ("regression" if task == "stsb" else "classification")
    assert data.metrics == TASKS[task].metrics
    # A task folder works as --data-dir too.
    assert len(load_glue(task, glue_dir / TASKS[task].folder).train) == n_train


def test_glue_dev_rows_hold_quotes_and_the_last_line_without_newline(glue_dir):
    assert load_glue("mrpc", glue_dir).evals["dev"][0]["text_b"] == '"The pie business does not fit.'
    cola = load_glue("cola", glue_dir).evals["dev"]
    assert cola[1] == {"text_a": "The more books I ask to whom.", "label": 0}
    assert load_glue("mnli", glue_dir).evals["mismatched"][0]["label"] == 2  # contradiction


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="shared GLUE files not present")
def test_shared_glue_files_load_with_official_counts():
    counts = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500), "rte": (2490, 277)}
    for task, (n_train, n_dev) in counts.items():
        data = load_glue(task, SHARED_GLUE)
        assert (len(data.train), len(data.evals["dev"])) == (n_train, n_dev), task
    assert sum(load_glue("mrpc", SHARED_GLUE).train["label"]) == 2474
    qnli = read_glue_tsv(SHARED_GLUE / "QNLI" / "dev.tsv", TASKS["qnli"])
    assert (len(qnli), list(qnli["label"]).count(0)) == (5463, 2702)


def test_hub_loader_renames_fields(monkeypatch):
    from datasets import Dataset

    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0]})

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_glue("mnli")
    assert calls == [("nyu-mll/glue", "mnli", s) for s in ("train", "validation_matched", "validation_mismatched")]
    assert data.train[0] == {"text_a": "p", "text_b": "h", "label": 2}


def test_own_data_csv_jsonl_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"review": ["good", "bad", "fine", "awful"], "stars": ["pos", "neg", "pos", "neg"], "score": [4.5, 1.0, 3.0, 0.5]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.to_json(tmp_path / "dev.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "test.parquet")
    data = load_labelled(tmp_path / "train.csv", tmp_path / "dev.jsonl", tmp_path / "test.parquet", text_columns=["review"], label_column="stars")
    assert data.label_names == ["neg", "pos"] and list(data.train["label"]) == [1, 0, 1, 0] and len(data.test) == 4
    assert data.metrics == ("accuracy", "f1")
    reg = load_labelled(tmp_path / "train.csv", kind="regression", text_columns=["review"], label_column="score", validation_fraction=0.25)
    assert (len(reg.train), len(reg.evals["validation"]), reg.num_labels) == (3, 1, 1)
    assert sorted([*reg.train["label"], *reg.evals["validation"]["label"]]) == [0.5, 1.0, 3.0, 4.5]


def test_conll_labels_align_to_first_subwords(tmp_path):
    (tmp_path / "train.conll").write_text("-DOCSTART- O\n\nJohn B-PER\nLoughborough B-LOC\nruns O\n\nParis B-LOC\n")
    data = load_labelled(tmp_path / "train.conll", tmp_path / "train.conll", kind="token_classification")
    assert data.label_names == ["B-LOC", "B-PER", "O"] and data.metrics == ("f1", "accuracy")
    tok = load_tokenizer()
    row = featurize(data, data.train, tok, 32)[0]
    pieces = tok.convert_ids_to_tokens(row["input_ids"])
    assert pieces[0] == "[CLS]" and len(pieces) > 5  # "loughborough" splits into several pieces
    expected = [-100, 1, 0] + [-100] * (len(pieces) - 5) + [2, -100]
    assert row["labels"] == expected


# ---------------------------------------------------------------------------------------
# Metrics


def test_metrics_against_hand_checked_values():
    labels = np.array([1, 0, 0, 1, 1])
    logits = np.array([[0, 1], [0, 2], [3, 0], [1, 0], [0, 1]], dtype=float)  # predicts 1 1 0 0 1
    m = compute_metrics(("accuracy", "f1", "matthews"), logits, labels, "classification")
    # TP=2 FP=1 FN=1 TN=1: accuracy 3/5, F1 = 4/6, MCC = (2*1-1*1)/sqrt(3*3*2*2) = 1/6
    assert m == pytest.approx({"accuracy": 0.6, "f1": 2 / 3, "matthews": 1 / 6})
    m = compute_metrics(("pearson", "spearman"), np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 4.0]), "regression")
    assert m == pytest.approx({"pearson": 9 / math.sqrt(84), "spearman": 1.0})  # cov 3 / (sqrt 2 * sqrt(42)/3)
    m = compute_metrics(("spearman",), np.array([[1.0], [2.0], [3.0]]), np.array([3.0, 1.0, 2.0]), "regression")
    assert m["spearman"] == pytest.approx(-0.5)  # 1 - 6 * (4+1+1) / (3 * 8)
    constant = compute_metrics(("pearson", "matthews"), np.array([[1.0], [1.0]]), np.array([0.0, 1.0]), "regression")
    assert constant["pearson"] == 0.0


def test_task_scores_and_the_glue_average():
    assert task_score({"f1": 0.9, "accuracy": 0.8}) == pytest.approx(0.85)
    assert task_score({"accuracy_matched": 0.86, "accuracy_mismatched": 0.88}) == pytest.approx(0.87)
    assert glue_average({"cola": 0.5, "mrpc": 0.85}) == pytest.approx(0.675)
    assert glue_average({}) is None


def test_entity_f1_on_bio_tags():
    assert bio_spans(["B-PER", "I-PER", "O", "I-LOC", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-PER"]]  # one of two entities right, one wrong
    assert entity_f1(pred, gold) == pytest.approx(0.5)
    labels = np.array([[-100, 0, 1, -100]])  # scored: positions 1 and 2 (B-PER I-PER)
    logits = np.eye(3)[[[0, 0, 1, 2]]]  # predicts B-PER B-PER I-PER O
    m = compute_metrics(("f1", "accuracy"), logits, labels, "token_classification", ["B-PER", "I-PER", "O"])
    assert m == pytest.approx({"f1": 1.0, "accuracy": 1.0})


# ---------------------------------------------------------------------------------------
# Training


def test_loss_goes_down_and_the_task_is_learned(tmp_path, tiny_model):
    data_dir = write_sst2(tmp_path / "glue", n_train=96)
    cfg = tiny_cfg(tiny_model, tmp_path / "run", "train.lr=3e-3", "train.epochs=4", "train.eval_every=12", "train.patience=0")
    result = run(cfg, load_glue("sst2", data_dir))
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) >= 4 and np.mean(losses[-2:]) < 0.5 * np.mean(losses[:2])
    assert result["metrics"]["accuracy"] >= 0.9


def test_early_stopping_after_patience_evaluations(tmp_path, tiny_model):
    data_dir = write_sst2(tmp_path / "glue", n_train=160)
    # lr 1e-12 (a learning rate must be positive): AdamW's steps of ~1e-12 leave fp32 weights of ~1e-2
    # unchanged, so the score never improves and training stops after the first evaluation + 2.
    cfg = tiny_cfg(tiny_model, tmp_path / "run", "train.lr=1e-12", "train.epochs=1", "train.eval_every=1", "train.patience=2")
    result = run(cfg, load_glue("sst2", data_dir))
    assert result["steps"] == 3 < 20 and result["best_step"] == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_glue_command_writes_results_and_a_pipeline_model(tmp_path, tiny_model, capsys):
    data_dir = write_sst2(tmp_path / "glue", n_train=16, n_dev=8)
    out = tmp_path / "out"
    code = cli(["glue", "sst2", "--model", str(tiny_model), "--data-dir", str(data_dir), "--output-dir", str(out),
                "train.max_steps=2", "train.lr=3e-5", "train.batch_size=8", "train.max_length=64", "train.seed=0", "train.bf16=false"])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert {"task", "split", "metrics", "model", "hyperparameters", "seed"} <= set(result)
    assert (result["task"], result["split"], list(result["metrics"]), result["model"], result["seed"]) == ("sst2", "dev", ["accuracy"], str(tiny_model), 0)
    assert {"lr": 3e-5, "batch_size": 8, "max_length": 64}.items() <= result["hyperparameters"].items()
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()

    from transformers import pipeline

    classify = pipeline("text-classification", model=str(out / "best"))
    assert classify("great movie")[0]["label"] in ("negative", "positive")


def test_mnli_reports_matched_and_mismatched_and_stsb_is_regression(tmp_path, tiny_model, glue_dir):
    mnli = run(tiny_cfg(tiny_model, tmp_path / "mnli", "train.max_steps=1"), load_glue("mnli", glue_dir))
    assert list(mnli["metrics"]) == ["accuracy_matched", "accuracy_mismatched"]
    # STS-B starting from the MNLI model: its 3-way head is replaced by a regression head.
    stsb = run(tiny_cfg(tiny_model, tmp_path / "stsb", "train.max_steps=1"), load_glue("stsb", glue_dir), init=str(tmp_path / "mnli" / "best"))
    assert list(stsb["metrics"]) == ["pearson", "spearman"] and stsb["hyperparameters"]["init"] == str(tmp_path / "mnli" / "best")
    assert json.loads((tmp_path / "stsb" / "best" / "config.json").read_text())["problem_type"] == "regression"


def test_grid_resumes_skipping_finished_runs(tmp_path, tiny_model, monkeypatch):
    data_dir = write_sst2(tmp_path / "glue", n_train=16, n_dev=8)
    out = tmp_path / "grid"
    args = ["glue", "sst2", "--grid", "--model", str(tiny_model), "--data-dir", str(data_dir), "--output-dir", str(out),
            "train.max_steps=1", "train.bf16=false", "glue.grid.batch_size=[8]", "glue.grid.lr=[1e-5,2e-5]", "glue.grid.weight_decay=[0.01]"]
    assert cli(args) == 0
    runs = sorted(p.parent.name for p in (out / "sst2").glob("*/results.json"))
    assert runs == ["bs8-lr1e-05-wd0.01-seed0", "bs8-lr2e-05-wd0.01-seed0"]
    assert len(list((out / "sst2").glob("*/best"))) == 1  # only the best point keeps its model
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["best"]) == {"sst2"} and summary["average"] == summary["best"]["sst2"]["score"]
    assert (out / "summary.md").read_text().startswith("# GLUE") and (out / "summary.png").stat().st_size > 0

    # Again with one more LR: only the new point runs; an unfinished point would start over.
    calls = []
    real_run = finetune.run
    monkeypatch.setattr(finetune, "run", lambda cfg, data, init=None: calls.append(cfg.train.lr) or real_run(cfg, data, init))
    assert cli([a if not a.startswith("glue.grid.lr") else "glue.grid.lr=[1e-5,2e-5,3e-5]" for a in args]) == 0
    assert calls == [3e-5]
    # Other settings in the same directory are refused.
    assert cli([*args, "train.max_length=32"]) == 2


def test_rte_starts_from_the_best_mnli_grid_run(tmp_path, tiny_model, glue_dir):
    common = ["--grid", "--model", str(tiny_model), "--data-dir", str(glue_dir), "--output-dir", str(tmp_path / "g"), "train.max_steps=1",
              "train.bf16=false", "glue.grid.batch_size=[8]", "glue.grid.lr=[1e-5]", "glue.grid.weight_decay=[0.01]", "glue.from_mnli=auto"]
    assert cli(["glue", "mnli", *common]) == 0 and cli(["glue", "rte", *common]) == 0
    (rte,) = (tmp_path / "g" / "rte").glob("*/results.json")
    mnli_model = tmp_path / "g" / "mnli" / "bs8-lr1e-05-wd0.01-seed0" / "best"
    assert json.loads(rte.read_text())["hyperparameters"]["init"] == str(mnli_model)
    assert set(json.loads((tmp_path / "g" / "summary.json").read_text())["best"]) == {"mnli", "rte"}


def test_finetune_command_on_own_csv(tmp_path, tiny_model):
    import pandas as pd

    texts, labels = sentiment_rows(24)
    pd.DataFrame({"text": texts, "label": ["pos" if y else "neg" for y in labels]}).to_csv(tmp_path / "train.csv", index=False)
    config = tmp_path / "own.yaml"
    config.write_text(f"model:\n  name: {tiny_model}\ndata:\n  train: {tmp_path / 'train.csv'}\ntrain:\n  max_steps: 1\n  bf16: false\n")
    assert cli(["finetune", str(config), f"train.output_dir={tmp_path / 'run'}"]) == 0
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (result["task"], result["split"], sorted(result["metrics"])) == ("custom", "validation", ["accuracy", "f1"])
    assert json.loads((tmp_path / "run" / "best" / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


def test_token_classification_trains_and_loads_in_a_pipeline(tmp_path, tiny_model):
    """The reported entity F1 and accuracy equal the ones computed here from the saved best/
    model's own predictions (first sub-word of each word, exact BIO spans), the model has
    learned the tags, and the directory loads in a token-classification pipeline."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    sentences = ["John B-PER\nlives O\nin O\nParis B-LOC\n", "Mary B-PER\nAnn I-PER\nvisits O\nRome B-LOC\n"] * 4
    (tmp_path / "train.conll").write_text("\n".join(sentences))
    cfg = tiny_cfg(tiny_model, tmp_path / "run", "train.max_steps=40", "train.lr=5e-3", "train.warmup_ratio=0")
    data = load_labelled(tmp_path / "train.conll", tmp_path / "train.conll", kind="token_classification")
    result = run(cfg, data)

    best = tmp_path / "run" / "best"
    model, tokenizer = AutoModelForTokenClassification.from_pretrained(best).eval(), AutoTokenizer.from_pretrained(best)
    gold, predicted = [], []
    for sentence in sentences:
        words, tags = zip(*(line.split() for line in sentence.splitlines()))
        enc = tokenizer(list(words), is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            ids = model(**enc).logits[0].argmax(-1).tolist()
        first = {w: i for i, w in reversed(list(enumerate(enc.word_ids()))) if w is not None}  # each word's first sub-word
        predicted.append([model.config.id2label[ids[first[w]]] for w in range(len(words))])
        gold.append(list(tags))

    def spans(tags):  # (type, start, end); an I- that does not continue an entity of its type starts one
        out, open_ = [], None
        for i, tag in enumerate([*tags, "O"]):
            if open_ and not (tag.startswith("I-") and tag[2:] == open_[0]):
                out.append((*open_, i))
                open_ = None
            if tag != "O" and open_ is None:
                open_ = (tag[2:], i)
        return set(out)

    hits = sum(len(spans(p) & spans(g)) for p, g in zip(predicted, gold))
    f1 = 2 * hits / sum(len(spans(p)) + len(spans(g)) for p, g in zip(predicted, gold))
    accuracy = np.mean([p == g for ps, gs in zip(predicted, gold) for p, g in zip(ps, gs)])
    assert list(result["metrics"]) == ["f1", "accuracy"]
    assert result["metrics"]["f1"] == pytest.approx(f1, abs=1e-12) and result["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert f1 > 0.5  # it learned the tags: a constant "O" scores 0

    tagger = pipeline("token-classification", model=str(best))
    assert {t["entity"] for t in tagger("John lives in Rome")} <= {"B-PER", "I-PER", "B-LOC", "O"}


# ---------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_one_line_errors(tmp_path, glue_dir, capsys):
    assert cli(["glue", "wnli", "--model", "x", "--data-dir", str(glue_dir), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown GLUE task 'wnli'" in err and "cola" in err

    bad = write_glue(tmp_path / "bad", {"SST-2/train.tsv": "sentence\tlabel\ngood\t1\nodd\t2\n", "SST-2/dev.tsv": "sentence\tlabel\n"})
    with pytest.raises(UserError, match=r"train.tsv:3: label '2' is not in the label set \['0', '1'\]"):
        load_glue("sst2", bad)
    (bad / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    with pytest.raises(UserError, match="dev.tsv: the split is empty"):
        load_glue("sst2", bad)
    (bad / "SST-2" / "dev.tsv").write_text("text\tlabel\ngood\t1\n")
    with pytest.raises(UserError, match=r"missing column\(s\) \['sentence'\]"):
        load_glue("sst2", bad)
    with pytest.raises(UserError, match="no MNLI/ folder"):
        load_glue("mnli", bad)

    (tmp_path / "own.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(UserError, match=r"missing column\(s\) \['sentence'\]"):
        load_labelled(tmp_path / "own.csv", tmp_path / "own.csv", text_columns=["sentence"])
    with pytest.raises(UserError, match=r"label 'neg' is not in the label set \['pos', 'meh'\]"):
        load_labelled(tmp_path / "own.csv", tmp_path / "own.csv", labels=["pos", "meh"])
    with pytest.raises(UserError, match="empty.csv: the split is empty"):
        load_labelled(tmp_path / "own.csv", tmp_path / "empty.csv")
    with pytest.raises(UserError, match="is not a number"):
        load_labelled(tmp_path / "own.csv", tmp_path / "own.csv", kind="regression")


def test_glue_config_is_the_paper_protocol():
    cfg = load_config(FinetuneConfig, CONFIGS / "glue.yaml")
    g, t = cfg.glue.grid, cfg.train
    assert (g.batch_size, g.lr, g.weight_decay) == ([2, 4, 8, 16, 32], [5e-6, 6e-6, 8e-6, 1e-5, 2e-5, 3e-5], [1e-2, 1e-5])
    assert (t.epochs, t.warmup_ratio) == (10, 0.06) and t.patience > 0
    assert finetune.eval_interval(100_000, 32, 0) == 312 and finetune.eval_interval(1_000_000, 32, 0) == 500


def test_glue_defaults_are_the_released_launchers(tmp_path, tiny_model):
    # chandar-lab/NeoBERT: jobs/glue/launcher.sh (early_stopping=15, max_length=1024 for NeoBERT)
    # and conf/glue.yaml (model.classifier_dropout: 0.1); the paper's Appendix C: 15 evaluations.
    for cfg in (FinetuneConfig(), load_config(FinetuneConfig, CONFIGS / "glue.yaml")):
        assert (cfg.train.max_length, cfg.train.patience, cfg.model.classifier_dropout) == (1024, 15, 0.1)
    sst2 = write_sst2(tmp_path) / "SST-2"
    data = load_labelled(sst2 / "train.tsv", sst2 / "dev.tsv", text_columns=["sentence"])
    model = finetune.load_model(str(tiny_model), data, FinetuneConfig().model.classifier_dropout)
    assert model.config.classifier_dropout == 0.1
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0} == {0.1}  # the head's
    own = NeoBERTConfig.from_pretrained(tiny_model).classifier_dropout
    assert finetune.load_model(str(tiny_model), data, None).config.classifier_dropout == own  # None: the model's own
