"""Sharing: a saved directory loads with only transformers installed (remote code), and
without ``trust_remote_code`` where ``neobert`` is imported, with identical outputs.

The "only transformers" side runs in a subprocess started with ``python -I`` (no
PYTHONPATH, no user site) whose first statement makes ``import neobert`` fail, since the
project's own venv has the package installed: the subprocess checks that it cannot import
it, then loads the copied directory through the Auto classes.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

from neobert import NeoBERTConfig, NeoBERTForMaskedLM, NeoBERTForSequenceClassification, NeoBERTForTokenClassification, NeoBERTModel

HEADS = [
    (NeoBERTModel, "AutoModel", "last_hidden_state"),
    (NeoBERTForMaskedLM, "AutoModelForMaskedLM", "logits"),
    (NeoBERTForSequenceClassification, "AutoModelForSequenceClassification", "logits"),
    (NeoBERTForTokenClassification, "AutoModelForTokenClassification", "logits"),
]

WITHOUT_NEOBERT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoNeobert(importlib.abc.MetaPathFinder):  # as if the package were not installed
        def find_spec(self, name, path=None, target=None):
            if name == "neobert" or name.startswith("neobert."):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoNeobert())
    try:
        import neobert
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("neobert is importable: the test would prove nothing")

    import transformers
    from safetensors.torch import load_file, save_file
    inputs, outputs = sys.argv[1:3]
    batch, results = load_file(inputs), {}
    for model_dir, auto_name, field in zip(*[iter(sys.argv[3:])] * 3):
        try:
            getattr(transformers, auto_name).from_pretrained(model_dir)
        except ValueError as error:
            assert "trust_remote_code" in str(error) or "neobert" in str(error), error
        else:
            raise SystemExit("loaded without trust_remote_code and without neobert")
        model = getattr(transformers, auto_name).from_pretrained(model_dir, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        results[auto_name] = model(**batch)[field].contiguous()
    save_file(results, outputs)
    """
)


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def test_saved_directories_load_with_only_transformers(tmp_path):
    """Every class, saved and copied elsewhere: identical outputs through remote code in a
    process without neobert, and through neobert's own classes here without remote code."""
    torch.manual_seed(0)
    config = NeoBERTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)
    batch = _batch(config.vocab_size)
    save_file(batch, tmp_path / "inputs.safetensors")
    expected, args = {}, []
    for cls, auto_name, field in HEADS:
        model = cls(config).eval()
        model.save_pretrained(tmp_path / "saved" / auto_name)
        saved = json.loads((tmp_path / "saved" / auto_name / "config.json").read_text())
        assert saved["auto_map"][auto_name] == f"modeling_neobert.{cls.__name__}"
        assert set(saved["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification"}
        shared = shutil.copytree(tmp_path / "saved" / auto_name, tmp_path / "elsewhere" / auto_name)  # the directory alone
        with torch.no_grad():
            expected[auto_name] = model(**batch)[field]
            native = getattr(transformers, auto_name).from_pretrained(shared).eval()  # neobert imported: no remote code
            assert type(native) is cls
            assert torch.equal(native(**batch)[field], expected[auto_name])
        args += [str(shared), auto_name, field]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [sys.executable, "-I", "-c", WITHOUT_NEOBERT, str(tmp_path / "inputs.safetensors"), str(tmp_path / "outputs.safetensors"), *args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = load_file(tmp_path / "outputs.safetensors")
    assert remote.keys() == expected.keys()
    for auto_name, value in expected.items():
        assert torch.equal(remote[auto_name], value), auto_name


def test_released_auto_map_is_replaced_by_this_files(tmp_path):
    """A released config names its own file (``model.NeoBERTConfig``); re-saved here, the
    map names the file that is copied beside the weights."""
    config = NeoBERTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           auto_map={"AutoConfig": "model.NeoBERTConfig", "AutoModel": "model.NeoBERT"})
    NeoBERTForMaskedLM(config).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert all(v.startswith("modeling_neobert.") for v in auto_map.values())
    for auto in (AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification):
        assert auto.from_pretrained(tmp_path).__class__.__module__ == "neobert.modeling_neobert"
