"""mteb itself runs ``load_encoder(...)`` and the ``export-st`` copy: in-memory STS and
retrieval tasks, scored by ``mteb.evaluate``, checked against the Spearman and nDCG@10
computed here from the embeddings."""

from pathlib import Path

import mteb
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from scipy.stats import spearmanr
from sentence_transformers import SentenceTransformer

from neobert import NeoBERTConfig, NeoBERTModel, load_tokenizer
from neobert.embeddings import export_sentence_transformers, load_encoder

# Sentence pairs with gold scores (0-5) in the STS benchmark's style, written here so the
# test needs no dataset hub.
PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
    ("A woman is slicing an onion.", "A woman is cutting an onion.", 4.6),
    ("A child is riding a horse.", "A young child rides a pony.", 4.0),
    ("Two dogs are running in a field.", "Dogs run across the grass.", 3.8),
    ("The stock market fell sharply today.", "Shares dropped steeply on Monday.", 3.4),
    ("A cat is sleeping on the sofa.", "A cat sits on a couch.", 3.0),
    ("A man is cooking pasta.", "A chef is boiling water.", 2.4),
    ("The train arrived late.", "The bus was on time.", 1.8),
    ("She is reading a book in the park.", "He is writing a letter at home.", 1.2),
    ("A plane is taking off.", "A man is eating a sandwich.", 0.6),
    ("The weather is sunny and warm.", "Quantum computers use qubits.", 0.2),
    ("A band plays music on stage.", "An orchestra performs a concert.", 3.2),
    ("The senate passed the new budget.", "Lawmakers approved the spending plan.", 4.2),
    ("A boy kicks a ball.", "A girl throws a frisbee.", 1.6),
    ("Heavy rain flooded the streets.", "Streets were flooded after a storm.", 4.4),
    ("A person is typing on a laptop.", "Someone is swimming in a lake.", 0.4),
]


class TinySTS(AbsTaskSTS):
    """An STS task whose data is ``PAIRS``, built in memory instead of downloaded."""

    metadata = TaskMetadata(
        name="NeobertTinySTS",
        dataset={"path": "local/neobert-tiny-sts", "revision": "1"},
        description="Sixteen sentence pairs with gold similarity scores, for testing the mteb integration.",
        type="STS",
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="cosine_spearman",
    )
    min_score = 0
    max_score = 5

    def load_data(self, num_proc=None, **kwargs) -> None:
        s1, s2, score = zip(*PAIRS)
        self.dataset = DatasetDict({"test": Dataset.from_dict({"sentence1": list(s1), "sentence2": list(s2), "score": list(score)})})
        self.data_loaded = True


class TinyRetrieval(AbsTaskRetrieval):
    """Each first sentence of ``PAIRS`` is a query whose one relevant document is its pair."""

    metadata = TaskMetadata(
        name="NeobertTinyRetrieval",
        dataset={"path": "local/neobert-tiny-retrieval", "revision": "1"},
        description="Sixteen queries, each with one relevant document among sixteen, for testing the mteb integration.",
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
    )

    def load_data(self, num_proc=None, **kwargs) -> None:
        queries = Dataset.from_dict({"id": [f"q{i}" for i in range(len(PAIRS))], "text": [p[0] for p in PAIRS]})
        corpus = Dataset.from_dict({"id": [f"d{i}" for i in range(len(PAIRS))], "text": [p[1] for p in PAIRS]})
        qrels = {f"q{i}": {f"d{i}": 1} for i in range(len(PAIRS))}
        self.dataset = {"default": {"test": {"corpus": corpus, "queries": queries, "relevant_docs": qrels, "top_ranked": None}}}
        self.data_loaded = True


PROMPTS = {"query": "query: ", "document": "passage: "}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A random tiny NeoBERT directory with the default tokenizer, its ``export-st`` copy, and
    a copy with saved query/document prompts."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("mteb")
    neo = root / "neo"
    config = NeoBERTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_length=64)
    NeoBERTModel(config).save_pretrained(neo)
    load_tokenizer().save_pretrained(neo)
    return neo, export_sentence_transformers(str(neo), root / "st"), export_sentence_transformers(str(neo), root / "st-prompts", prompts=PROMPTS)


def expected_spearman(embed) -> float:
    """Spearman of the gold scores against the cosine of each pair's embeddings, computed here."""
    a, b = embed([p[0] for p in PAIRS]), embed([p[1] for p in PAIRS])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(spearmanr([p[2] for p in PAIRS], cos).statistic)


def expected_ndcg_at_10(embed_queries, embed_documents) -> float:
    """nDCG@10 with one relevant document per query: 1 / log2(1 + its cosine rank) within the top 10."""
    q, d = embed_queries([p[0] for p in PAIRS]), embed_documents([p[1] for p in PAIRS])
    q, d = q / np.linalg.norm(q, axis=1, keepdims=True), d / np.linalg.norm(d, axis=1, keepdims=True)
    sim = q @ d.T
    ranks = 1 + (sim > np.diag(sim)[:, None]).sum(1)
    return float(np.mean(np.where(ranks <= 10, 1 / np.log2(1 + ranks), 0.0)))


def mteb_scores(model, task=None) -> dict:
    # cache=None: mteb would otherwise store, and later return, results under the model's
    # name, which is "no_model_name/available" for an unnamed local SentenceTransformer
    result = mteb.evaluate(model, task or TinySTS(), cache=None, show_progress_bar=False)
    assert not result.exceptions
    [task_result] = result.task_results
    [scores] = task_result.scores["test"]
    return scores


def test_mteb_evaluates_load_encoder_and_the_exported_model(model_dirs):
    neo, st_dir, _ = model_dirs
    encoder = load_encoder(str(neo), device="cpu")
    st = SentenceTransformer(str(st_dir), device="cpu")
    ours, exported = mteb_scores(encoder), mteb_scores(st)
    reference = expected_spearman(lambda texts: encoder.encode(texts))
    assert abs(reference) > 0.05  # a score that a broken pairing or ordering would change
    for scores in (ours, exported):
        assert scores["main_score"] == scores["cosine_spearman"]
        assert scores["cosine_spearman"] == pytest.approx(reference, abs=1e-6)
        assert scores["spearman"] == pytest.approx(reference, abs=1e-6)  # the model's similarity: cosine
    assert ours["cosine_spearman"] == pytest.approx(exported["cosine_spearman"], abs=1e-6)
    assert expected_spearman(lambda texts: st.encode(texts)) == pytest.approx(reference, abs=1e-6)
    assert encoder.mteb_model_meta.name == str(neo.resolve())


def test_mteb_retrieval_applies_the_saved_prompts(model_dirs):
    """Retrieval goes through the model's similarity and its saved query/document prompts."""
    _, _, prompted = model_dirs
    encoder = load_encoder(str(prompted), device="cpu")
    st = SentenceTransformer(str(prompted), device="cpu")
    reference = expected_ndcg_at_10(
        lambda texts: encoder.encode(texts, prompt=PROMPTS["query"]), lambda texts: encoder.encode(texts, prompt=PROMPTS["document"])
    )
    # the prompts change the ranking, so a run that dropped them would fail below
    assert reference != pytest.approx(expected_ndcg_at_10(encoder.encode, encoder.encode), abs=1e-3)
    for model in (encoder, st):
        scores = mteb_scores(model, TinyRetrieval())
        assert scores["main_score"] == scores["ndcg_at_10"]
        assert scores["ndcg_at_10"] == pytest.approx(reference, abs=6e-6)  # mteb rounds it to 5 decimals
