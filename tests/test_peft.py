"""LoRA with peft on NeoBERTForSequenceClassification: a saved adapter, loaded into a fresh
base, reproduces the trained model's logits exactly, provided ``modules_to_save`` holds the
whole classification head.

The base is a masked-LM checkpoint, as in real fine-tuning: ``from_pretrained`` gives the
head's ``dense`` and ``classifier`` a fresh random init every time. peft's SEQ_CLS task saves
``classifier`` (and ``score``) by default, but not ``dense``; the second test shows that
without ``dense`` the reloaded model computes different logits.
"""

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from neobert import NeoBERTConfig, NeoBERTForMaskedLM, NeoBERTForSequenceClassification

TARGETS = ["qkv", "wo", "w12", "w3"]  # attention in/out projections and both SwiGLU matrices


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = NeoBERTConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_length=32)
    d = tmp_path_factory.mktemp("peft") / "mlm"
    NeoBERTForMaskedLM(config).save_pretrained(d)
    return d


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding: the padding-free path runs too
    mask[3, 5:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def fresh_classifier(mlm_dir, seed: int) -> NeoBERTForSequenceClassification:
    """The base as a user loads it: the head (dense, classifier) newly initialised from ``seed``."""
    torch.manual_seed(seed)
    return NeoBERTForSequenceClassification.from_pretrained(mlm_dir, num_labels=3)


def train_and_reload(mlm_dir, tmp_path, modules_to_save):
    """Train LoRA for two steps, save the adapter, load it into a differently seeded base."""
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, modules_to_save=modules_to_save)
    model = get_peft_model(fresh_classifier(mlm_dir, seed=1), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        trained = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(fresh_classifier(mlm_dir, seed=2), tmp_path / "adapter").eval()
    with torch.no_grad():
        return model, trained, reloaded(**inputs).logits


def test_lora_adapter_with_the_whole_head_reproduces_logits_exactly(mlm_dir, tmp_path):
    model, trained, reloaded = train_and_reload(mlm_dir, tmp_path, modules_to_save=["dense", "classifier"])
    # the adapter really trained: LoRA B matrices start at zero, every targeted layer is wrapped
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 * 2 and all(p.abs().sum() > 0 for p in lora_b)
    # the two bases differ (their heads come from different seeds) ...
    assert not torch.equal(fresh_classifier(mlm_dir, 1).dense.weight, fresh_classifier(mlm_dir, 2).dense.weight)
    # ... yet the reloaded adapter gives bit-identical logits
    assert torch.equal(reloaded, trained)


def test_without_dense_in_modules_to_save_the_reloaded_logits_differ(mlm_dir, tmp_path):
    # peft's SEQ_CLS default: only `classifier` (and `score`) are saved; `dense` stays the fresh base's
    model, trained, reloaded = train_and_reload(mlm_dir, tmp_path, modules_to_save=None)
    assert "dense" not in model.peft_config["default"].modules_to_save
    assert (reloaded - trained).abs().max() > 1e-3
