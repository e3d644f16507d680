"""transformers' own common tests on NeoBERT: ModelTesterMixin, ConfigTester, PipelineTesterMixin.

The test files are not committed: ``transformers_suite`` downloads the sdist of the
installed transformers from PyPI at test time (once per cache) and imports them. The
tester below is modelled on transformers' ModernBERT tester
(tests/models/modernbert/test_modeling_modernbert.py, not in the sdist).

Provenance of the run recorded here: transformers 5.24.0, sdist transformers-5.24.0.tar.gz
sha256 906cb8c3cb2123575e263962586a4d21a979ce97feeb95fe6aaf66fe6ae88bf3;
tests/test_modeling_common.py d73163a672c297372aa0c7d69ab7909a703627fa32483c62d563e59927d721d3,
tests/test_configuration_common.py a8ac6455ff1bc085c147de71930a3bf57eb4e1ff880102ccaa627477b1f111e4,
tests/test_pipeline_mixin.py ecde09c7f2b12e3cc0adcf2f12551df1b4d587bff3777ee14c26476c40857c52.
``test_provenance`` checks these when the installed version is 5.24.0 (another version is
fetched and run the same way, with its own hashes in the cache's provenance.json).
"""

import json
import unittest
from unittest import mock

import pytest
import torch
import transformers
from transformers import pipeline
from transformers.models.auto import modeling_auto
from transformers.testing_utils import CaptureLogger

import transformers_suite
from neobert import (
    load_tokenizer,
    NeoBERTConfig,
    NeoBERTForMaskedLM,
    NeoBERTForSequenceClassification,
    NeoBERTForTokenClassification,
    NeoBERTModel,
)

RECORDED = {
    "version": "5.24.0",
    "sdist_sha256": "906cb8c3cb2123575e263962586a4d21a979ce97feeb95fe6aaf66fe6ae88bf3",
    "test_modeling_common.py": "d73163a672c297372aa0c7d69ab7909a703627fa32483c62d563e59927d721d3",
    "test_configuration_common.py": "a8ac6455ff1bc085c147de71930a3bf57eb4e1ff880102ccaa627477b1f111e4",
    "test_pipeline_mixin.py": "ecde09c7f2b12e3cc0adcf2f12551df1b4d587bff3777ee14c26476c40857c52",
}

# PipelineTesterMixin loads "tiny models" from the Hub by class name; here they are made
# locally (fixture below) under the layout TRANSFORMERS_TINY_MODEL_PATH points to.
PIPELINE_MODELS = {
    "feature-extraction": NeoBERTModel,
    "fill-mask": NeoBERTForMaskedLM,
    "text-classification": NeoBERTForSequenceClassification,
    "token-classification": NeoBERTForTokenClassification,
    "zero-shot": NeoBERTForSequenceClassification,
}
TINY_MODELS = transformers_suite.cache_root() / "tiny-models"  # rewritten by the fixture each session
(TINY_MODELS / "reports").mkdir(parents=True, exist_ok=True)
(TINY_MODELS / "reports" / "tiny_model_summary.json").write_text(json.dumps({
    cls.__name__: {"tokenizer_classes": ["BertTokenizer"], "processor_classes": [], "model_classes": [cls.__name__]}
    for cls in PIPELINE_MODELS.values()
}))
suite = transformers_suite.load(TINY_MODELS)
common = suite["test_modeling_common"]
ModelTesterMixin, ids_tensor, random_attention_mask = common.ModelTesterMixin, common.ids_tensor, common.random_attention_mask
ConfigTester = suite["test_configuration_common"].ConfigTester
PipelineTesterMixin = suite["test_pipeline_mixin"].PipelineTesterMixin


@pytest.fixture(autouse=True, scope="module")
def neobert_in_the_auto_mappings():
    """The tests choose labels and skip base models by the class names in transformers' Auto
    mappings; NeoBERT is registered at run time instead, so its names are added here as they
    would be were it part of transformers."""
    names = {
        "MODEL_MAPPING_NAMES": "NeoBERTModel",
        "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "NeoBERTForMaskedLM",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "NeoBERTForSequenceClassification",
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "NeoBERTForTokenClassification",
    }
    patches = [mock.patch.dict(getattr(modeling_auto, mapping), {"neobert": name}) for mapping, name in names.items()]
    for patch in patches:
        patch.start()
    yield
    for patch in patches:
        patch.stop()


@pytest.fixture(autouse=True, scope="module")
def tiny_pipeline_models():
    """A tiny model of each pipeline class with the project's tokenizer, where the mixin looks."""
    tokenizer = load_tokenizer()
    for cls in set(PIPELINE_MODELS.values()):
        torch.manual_seed(0)
        config = NeoBERTModelTester(None).get_config()
        config.vocab_size = len(tokenizer)
        config.num_labels = 3
        path = TINY_MODELS / "neobert" / cls.__name__
        cls(config).save_pretrained(path)
        tokenizer.save_pretrained(path)


# ---------------------------------------------------------------------------------------
# The per-task checks PipelineTesterMixin calls (transformers' tests/pipelines/, which the
# sdist does not ship, written here): each pipeline's answer against the model run directly.


def _direct(model, tokenizer, text):
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return inputs, model(**inputs)


class FeatureExtractionChecks:
    def get_test_pipeline(self, model, tokenizer, image_processor=None, feature_extractor=None, processor=None, dtype="float32"):
        return pipeline("feature-extraction", model=model, tokenizer=tokenizer, dtype=dtype), ["a short one", "this text is a little longer"]

    def run_pipeline_test(self, extractor, examples):
        for text in examples:
            got = torch.tensor(extractor(text))[0]
            inputs, out = _direct(extractor.model, extractor.tokenizer, text)
            assert got.shape == (inputs["input_ids"].shape[1], extractor.model.config.hidden_size)
            torch.testing.assert_close(got, out.last_hidden_state[0].float(), atol=1e-3, rtol=1e-3)


class FillMaskChecks:
    def get_test_pipeline(self, model, tokenizer, image_processor=None, feature_extractor=None, processor=None, dtype="float32"):
        fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=3, dtype=dtype)
        return fill, [f"the river {tokenizer.mask_token} was quiet", f"a {tokenizer.mask_token} test"]

    def run_pipeline_test(self, fill, examples):
        for text in examples:
            answers = fill(text)
            inputs, out = _direct(fill.model, fill.tokenizer, text)
            position = (inputs["input_ids"][0] == fill.tokenizer.mask_token_id).nonzero().item()
            probs = out.logits[0, position].float().softmax(-1)
            top = probs.topk(3)
            assert [a["token"] for a in answers] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([a["score"] for a in answers]), top.values, atol=1e-3, rtol=1e-2)
            assert all(fill.tokenizer.mask_token not in a["sequence"] for a in answers)


class TextClassificationChecks:
    def get_test_pipeline(self, model, tokenizer, image_processor=None, feature_extractor=None, processor=None, dtype="float32"):
        return pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None, dtype=dtype), ["good film", "the plot was thin and slow"]

    def run_pipeline_test(self, classify, examples):
        for text in examples:
            (answers,) = classify([text])  # all labels of one text
            _, out = _direct(classify.model, classify.tokenizer, text)
            probs = out.logits[0].float().softmax(-1)
            expected = {classify.model.config.id2label[i]: p.item() for i, p in enumerate(probs)}
            assert {a["label"] for a in answers} == set(expected)
            for a in answers:
                assert abs(a["score"] - expected[a["label"]]) < 1e-3


class TokenClassificationChecks:
    def get_test_pipeline(self, model, tokenizer, image_processor=None, feature_extractor=None, processor=None, dtype="float32"):
        return pipeline("token-classification", model=model, tokenizer=tokenizer, dtype=dtype), ["alice went to paris", "bob"]

    def run_pipeline_test(self, tag, examples):
        for text in examples:
            entities = tag(text)
            inputs, out = _direct(tag.model, tag.tokenizer, text)
            labels = out.logits[0].argmax(-1)
            words = [(i, t) for i, t in enumerate(inputs["input_ids"][0].tolist()) if t not in tag.tokenizer.all_special_ids]
            assert [e["index"] for e in entities] == [i for i, _ in words]  # no label is "O": every word token is an entity
            assert [e["entity"] for e in entities] == [tag.model.config.id2label[labels[i].item()] for i, _ in words]
            assert all(text[e["start"] : e["end"]] == e["word"] for e in entities)


class ZeroShotChecks:
    def get_test_pipeline(self, model, tokenizer, image_processor=None, feature_extractor=None, processor=None, dtype="float32"):
        labels = ["sport", "politics", "science"]  # default labels: the mixin's batch test passes bare texts
        return pipeline("zero-shot-classification", model=model, tokenizer=tokenizer, candidate_labels=labels, dtype=dtype), ["the match ended in a draw"]

    def run_pipeline_test(self, zero_shot, examples):
        for text in examples:
            answer = zero_shot(text)
            assert sorted(answer["labels"]) == ["politics", "science", "sport"]
            assert abs(sum(answer["scores"]) - 1) < 1e-3 and answer["scores"] == sorted(answer["scores"], reverse=True)
            multi = zero_shot(text, candidate_labels=["sport", "politics"], multi_label=True)
            assert all(0 <= score <= 1 for score in multi["scores"])


CHECKS = {
    "feature-extraction": FeatureExtractionChecks,
    "fill-mask": FillMaskChecks,
    "text-classification": TextClassificationChecks,
    "token-classification": TokenClassificationChecks,
    "zero-shot": ZeroShotChecks,
}
for task, checks in CHECKS.items():
    suite["test_pipeline_mixin"].pipeline_test_mapping[task]["test"] = f"{__name__}.{checks.__name__}"


def test_provenance():
    if transformers.__version__ == RECORDED["version"]:
        assert suite["provenance"]["sdist_sha256"] == RECORDED["sdist_sha256"]
        for name in transformers_suite.FILES:
            assert suite["provenance"][name] == RECORDED[name], name


class NeoBERTModelTester:
    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_labels=True,
        vocab_size=99,
        pad_token_id=0,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        classifier_dropout=0.0,
        max_length=512,
        type_sequence_label_size=2,
        num_labels=3,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.classifier_dropout = classifier_dropout
        self.max_length = max_length
        self.type_sequence_label_size = type_sequence_label_size
        self.num_labels = num_labels

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        sequence_labels = token_labels = None
        if self.use_labels:
            sequence_labels = ids_tensor([self.batch_size], self.type_sequence_label_size)
            token_labels = ids_tensor([self.batch_size, self.seq_length], self.num_labels)
        return self.get_config(), input_ids, input_mask, sequence_labels, token_labels

    def get_config(self):
        return NeoBERTConfig(
            vocab_size=self.vocab_size,
            pad_token_id=self.pad_token_id,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            classifier_dropout=self.classifier_dropout,
            max_length=self.max_length,
        )

    def create_and_check_model(self, config, input_ids, input_mask, sequence_labels, token_labels):
        model = NeoBERTModel(config=config).eval()
        model(input_ids, attention_mask=input_mask)
        result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def create_and_check_for_masked_lm(self, config, input_ids, input_mask, sequence_labels, token_labels):
        model = NeoBERTForMaskedLM(config=config).eval()
        result = model(input_ids, attention_mask=input_mask, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))

    def create_and_check_for_sequence_classification(self, config, input_ids, input_mask, sequence_labels, token_labels):
        config.num_labels = self.num_labels
        model = NeoBERTForSequenceClassification(config).eval()
        result = model(input_ids, attention_mask=input_mask, labels=sequence_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))

    def create_and_check_for_token_classification(self, config, input_ids, input_mask, sequence_labels, token_labels):
        config.num_labels = self.num_labels
        model = NeoBERTForTokenClassification(config=config).eval()
        result = model(input_ids, attention_mask=input_mask, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.num_labels))

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}


class NeoBERTModelTest(ModelTesterMixin, PipelineTesterMixin, unittest.TestCase):
    all_model_classes = (NeoBERTModel, NeoBERTForMaskedLM, NeoBERTForSequenceClassification, NeoBERTForTokenClassification)
    pipeline_model_mapping = PIPELINE_MODELS
    test_can_init_all_missing_weights_before_2023 = True  # the model file has no "# Copyright <year>" line to date it

    def setUp(self):
        self.model_tester = NeoBERTModelTester(self)
        self.config_tester = ConfigTester(self, config_class=NeoBERTConfig, hidden_size=36)  # ModernBERT's 37 is no multiple of 12 heads

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_masked_lm(self):
        self.model_tester.create_and_check_for_masked_lm(*self.model_tester.prepare_config_and_inputs())

    def test_for_sequence_classification(self):
        self.model_tester.create_and_check_for_sequence_classification(*self.model_tester.prepare_config_and_inputs())

    def test_for_token_classification(self):
        self.model_tester.create_and_check_for_token_classification(*self.model_tester.prepare_config_and_inputs())

    def test_for_warning_if_padding_and_no_attention_mask(self):
        config, input_ids, *_ = self.model_tester.prepare_config_and_inputs()
        input_ids[0, 0] = config.pad_token_id
        logger = transformers.logging.get_logger("transformers.modeling_utils")
        logger.warning_once.cache_clear()
        with CaptureLogger(logger) as captured:
            NeoBERTModel(config=config).eval()(input_ids, attention_mask=None)
        self.assertIn("We strongly recommend passing in an `attention_mask`", captured.out)


def test_a_failed_download_is_an_error_naming_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOBERT_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not download the transformers 0.0.0 sdist.*pip download transformers==0.0.0"):
        transformers_suite.fetch("0.0.0")
    assert not any(tmp_path.iterdir())  # nothing half-written is left to be taken for a cache
