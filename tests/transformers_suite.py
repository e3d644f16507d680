"""transformers' own common model tests, fetched at test time for the installed version.

``load()`` downloads the sdist of the installed transformers from PyPI with pip (once, into
a cache directory), extracts ``tests/test_modeling_common.py``,
``tests/test_configuration_common.py`` and ``tests/test_pipeline_mixin.py`` into an importable
package ``transformers_tests`` and imports it. Nothing of transformers is committed here. A
failed download raises ``RuntimeError`` with the command and pip's message: the tests that
need these files fail, they are not skipped.

The sdist does not ship every module those files import. The missing ones get stand-ins
written by this project (below), each saying what it replaces:

- ``tests/exporters/test_export.py`` (``ExportTesterMixin``, the export tests every model
  tester inherits): an empty mixin; NeoBERT's export and compile tests are
  ``tests/test_export.py``.
- ``tests/generation/test_utils.py`` (``GenerationTesterMixin``): only used in
  ``issubclass`` checks; NeoBERT does not generate.
- ``tests/utils/test_configuration_utils.py`` (``config_common_kwargs``): a non-default value
  for every field of transformers' ``PretrainedConfig``, which ``ConfigTester`` sets and reads back.
- ``tests/pipelines/test_pipelines_*.py`` (the per-task checks ``PipelineTesterMixin``
  calls) and the Hub's tiny models: see ``tests/test_transformers_common.py``.

Cache: ``$NEOBERT_CACHE`` or ``~/.cache/neobert`` (the data cache's root), ``transformers-tests-<version>/``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_pipeline_mixin.py")

STAND_INS = {
    "exporters/test_export.py": '''"""Stand-in (neobert): the transformers sdist does not ship tests/exporters/test_export.py.
NeoBERT's torch.export / ONNX / compile tests are tests/test_export.py of the neobert repository."""


class ExportTesterMixin:
    pass
''',
    "generation/test_utils.py": '''"""Stand-in (neobert): the transformers sdist does not ship tests/generation/test_utils.py;
test_modeling_common only uses GenerationTesterMixin in issubclass checks (NeoBERT does not generate)."""


class GenerationTesterMixin:
    pass
''',
    "utils/test_configuration_utils.py": '''"""Stand-in (neobert): the transformers sdist does not ship tests/utils/test_configuration_utils.py.
A non-default value for every field of transformers' PretrainedConfig; ConfigTester sets them and reads them back."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
''',
}


def cache_root() -> Path:
    return Path(os.environ.get("NEOBERT_CACHE", "~/.cache/neobert")).expanduser()  # the data cache's root too


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(version: str = transformers.__version__) -> Path:
    """The directory holding package ``transformers_tests`` for ``version`` (downloaded once)."""
    root = cache_root() / f"transformers-tests-{version}"
    if (root / "provenance.json").exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:", "--no-deps", "-d", tmp, "-q"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        sdists = list(Path(tmp).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise RuntimeError(
                f"could not download the transformers {version} sdist (its tests drive tests/test_transformers_common.py); "
                f"PyPI must be reachable: {' '.join(command)}\n{result.stderr.strip()[-2000:]}"
            )
        staging = Path(tmp) / "staging"
        package = staging / "transformers_tests"
        package.mkdir(parents=True)
        with tarfile.open(sdists[0]) as archive:
            for name in FILES:
                member = archive.getmember(f"transformers-{version}/tests/{name}")
                (package / name).write_bytes(archive.extractfile(member).read())
        for relative, text in STAND_INS.items():
            path = package / relative
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text)
        (package / "__init__.py").touch()
        # test_pipeline_mixin runs <root>/src/transformers/__init__.py and then uses
        # sys.modules["transformers"]: an empty file there leaves that the installed package
        (staging / "src" / "transformers").mkdir(parents=True)
        (staging / "src" / "transformers" / "__init__.py").write_text('"""Stand-in (neobert): keeps the installed transformers."""\n')
        provenance = {"sdist": sdists[0].name, "sdist_sha256": sha256(sdists[0])} | {name: sha256(package / name) for name in FILES}
        (staging / "provenance.json").write_text(json.dumps(provenance, indent=1))
        root.parent.mkdir(parents=True, exist_ok=True)
        if not root.exists():  # another run may have finished first
            shutil.move(str(staging), root)
    return root


def load(tiny_models: Path) -> dict:
    """Import the fetched test files; returns their modules and the provenance record.

    ``tiny_models`` is where ``PipelineTesterMixin`` finds its tiny models
    (``TRANSFORMERS_TINY_MODEL_PATH``, read when its module is imported); its
    ``reports/tiny_model_summary.json`` must exist by then.
    """
    root = fetch()
    os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = str(tiny_models)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    modules = {name[:-3]: importlib.import_module(f"transformers_tests.{name[:-3]}") for name in FILES}
    return modules | {"provenance": json.loads((root / "provenance.json").read_text())}
