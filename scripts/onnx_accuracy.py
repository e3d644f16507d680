"""SST-2 accuracy and STS-B Spearman of a small NeoBERT in PyTorch, onnxruntime fp32 and int8.

    PYTHONPATH=src python scripts/onnx_accuracy.py --json docs/deploy/onnx-accuracy.json

No trained NeoBERT ships with the project, so this trains one here: a 4 x 128 NeoBERT from
random weights on SST-2 train (``--steps`` AdamW steps of 32 sentences), then exports it with
``neobert export-onnx --task classification --int8`` and scores the 872 dev sentences with
PyTorch and both ONNX files. Its encoder, exported with ``--task embeddings`` (mean
pooling), scores STS-B dev by the Spearman correlation of cosine similarities with the gold
scores. The point is the change from quantization, not the figures themselves (a pretrained,
contrastively trained encoder does far better).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from scipy.stats import spearmanr

from neobert import NeoBERTConfig, NeoBERTForSequenceClassification, cli, load_tokenizer
from neobert.export import SentenceEmbedding

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def read(split: str) -> tuple[list[str], list[int]]:
    with open(GLUE / "SST-2" / f"{split}.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    config = NeoBERTConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512, num_labels=2)
    model = NeoBERTForSequenceClassification(config)
    texts, labels = read("train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    order = torch.randperm(len(texts)).tolist()
    model.train()
    for step in range(args.steps):
        idx = order[step * 32 % len(order) :][:32]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor([labels[i] for i in idx])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    model.eval()
    dev_texts, dev_labels = read("dev")
    batches = [tokenizer(dev_texts[i : i + 64], padding=True, return_tensors="np") for i in range(0, len(dev_texts), 64)]
    results = {"steps": args.steps, "dev_sentences": len(dev_texts)}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        tokenizer.save_pretrained(Path(tmp) / "model")
        cli.main(["export-onnx", "--model", str(Path(tmp) / "model"), "--task", "classification", "--int8", "--output", str(Path(tmp) / "onnx")])
        with torch.no_grad():
            torch_pred = np.concatenate([model(input_ids=torch.from_numpy(b["input_ids"]), attention_mask=torch.from_numpy(b["attention_mask"])).logits.argmax(-1).numpy() for b in batches])
        predictions = {"PyTorch fp32": torch_pred}
        for name, file in [("onnxruntime fp32", "model.onnx"), ("onnxruntime int8 (dynamic)", "model_quantized.onnx")]:
            session = onnxruntime.InferenceSession(str(Path(tmp) / "onnx" / file), providers=["CPUExecutionProvider"])
            predictions[name] = np.concatenate([session.run(None, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})[0].argmax(-1) for b in batches])
        with open(GLUE / "STS-B" / "dev.tsv", newline="") as f:
            pairs = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        cli.main(["export-onnx", "--model", str(Path(tmp) / "model"), "--task", "embeddings", "--int8", "--output", str(Path(tmp) / "embeddings")])
        encoder = SentenceEmbedding(model.model).eval()
        sts = {}
        for name, file in [("PyTorch fp32", None), ("onnxruntime fp32", "model.onnx"), ("onnxruntime int8 (dynamic)", "model_quantized.onnx")]:
            session = file and onnxruntime.InferenceSession(str(Path(tmp) / "embeddings" / file), providers=["CPUExecutionProvider"])
            sides = []
            for column in ("sentence1", "sentence2"):
                chunks = []
                for i in range(0, len(pairs), 64):
                    b = tokenizer([p[column] for p in pairs[i : i + 64]], padding=True, return_tensors="np")
                    if session is None:
                        with torch.no_grad():
                            chunks.append(encoder(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"])).numpy())
                    else:
                        chunks.append(session.run(None, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})[0])
                sides.append(np.concatenate(chunks))
            cosine = (sides[0] * sides[1]).sum(1) / np.linalg.norm(sides[0], axis=1) / np.linalg.norm(sides[1], axis=1)
            sts[name] = float(spearmanr(cosine, [float(p["score"]) for p in pairs]).statistic)
    gold = np.array(dev_labels)
    for name, pred in predictions.items():
        results[name] = {"sst2_accuracy": float((pred == gold).mean()), "sst2_same_prediction_as_torch": float((pred == torch_pred).mean()), "stsb_spearman": sts[name]}
        print(f"{name:28} SST-2 dev accuracy {results[name]['sst2_accuracy']:.4f} (same prediction as PyTorch {results[name]['sst2_same_prediction_as_torch']:.4f}), STS-B Spearman {sts[name]:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
