"""neobert: the NeoBERT encoder for transformers, with pretraining, fine-tuning and embeddings.

Importing the package registers NeoBERT with the ``transformers`` Auto classes, so
``AutoModelForMaskedLM.from_pretrained(dir)`` works on any directory whose config says
``model_type: neobert``, without ``trust_remote_code``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from neobert.modeling_neobert import (
    NeoBERTConfig,
    NeoBERTForMaskedLM,
    NeoBERTForSequenceClassification,
    NeoBERTForTokenClassification,
    NeoBERTModel,
    NeoBERTPreTrainedModel,
)
from neobert.tokenizer import load_tokenizer

__version__ = "0.1.0"

AutoConfig.register("neobert", NeoBERTConfig, exist_ok=True)
AutoModel.register(NeoBERTConfig, NeoBERTModel, exist_ok=True)
AutoModelForMaskedLM.register(NeoBERTConfig, NeoBERTForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(NeoBERTConfig, NeoBERTForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(NeoBERTConfig, NeoBERTForTokenClassification, exist_ok=True)

__all__ = [
    "NeoBERTConfig",
    "NeoBERTPreTrainedModel",
    "NeoBERTModel",
    "NeoBERTForMaskedLM",
    "NeoBERTForSequenceClassification",
    "NeoBERTForTokenClassification",
    "load_tokenizer",
]
