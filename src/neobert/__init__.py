"""neobert: the NeoBERT encoder for transformers, with pretraining, fine-tuning and embeddings.

Importing the package registers NeoBERT with the ``transformers`` Auto classes, so
``AutoModelForMaskedLM.from_pretrained(dir)`` works on any directory whose config says
``model_type: neobert``, without ``trust_remote_code``.
"""

import transformers

from neobert import modeling_neobert
from neobert.modeling_neobert import NeoBERTConfig, NeoBERTForMaskedLM, NeoBERTForSequenceClassification, NeoBERTForTokenClassification, NeoBERTModel, NeoBERTPreTrainedModel
from neobert.tokenizer import load_tokenizer

__version__ = "0.1.0"

AUTO_CLASSES = {
    "AutoModel": NeoBERTModel,
    "AutoModelForMaskedLM": NeoBERTForMaskedLM,
    "AutoModelForSequenceClassification": NeoBERTForSequenceClassification,
    "AutoModelForTokenClassification": NeoBERTForTokenClassification,
}
transformers.AutoConfig.register("neobert", NeoBERTConfig, exist_ok=True)
for auto_class, model_class in AUTO_CLASSES.items():
    getattr(transformers, auto_class).register(NeoBERTConfig, model_class, exist_ok=True)

__all__ = [*modeling_neobert.__all__, "load_tokenizer"]
