"""The command line's shared pieces: help on every command, the fast entry point, atomic directories."""

import dataclasses
import subprocess
import sys
import typing

import pytest

from neobert.cli import COMMANDS
from neobert.cli import main as cli
from neobert.config import field_docs
from neobert.files import atomic_dir
from neobert.train.contrastive import ContrastiveConfig
from neobert.train.extend import ExtendConfig
from neobert.train.finetune import FinetuneConfig
from neobert.train.pretrain import PretrainConfig

CONFIGS = {"pretrain": PretrainConfig, "extend": ExtendConfig, "contrastive": ContrastiveConfig, "finetune": FinetuneConfig}


def sections(cls):
    """Every dataclass reachable from a command's config (its sections, then itself)."""
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from sections(hint)
    yield cls


@pytest.mark.parametrize("command", CONFIGS)
def test_every_config_key_is_documented(command):
    for cls in sections(CONFIGS[command]):
        docs = field_docs(cls)
        plain = [f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])]
        assert [name for name in plain if not docs.get(name)] == [], f"{cls.__name__} has undocumented keys"


@pytest.mark.parametrize("command", CONFIGS)
def test_config_command_help_lists_keys_with_defaults_and_docs(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: neobert {command} [CONFIG.yaml] [key=value ...]")
    train = CONFIGS[command]().train
    assert f"  train.output_dir = {train.output_dir}\n" in out  # the command's own default, not the base's
    assert "      " + field_docs(type(train))["seed"].splitlines()[0] in out  # a shared key keeps its one documentation


@pytest.mark.parametrize("command", ["plot", "summary", "glue", "embed", "export-st", "bench"])
def test_argparse_commands_answer_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: neobert {command} ")


def test_argparse_errors_are_one_line(capsys):
    assert cli(["plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: neobert plot: the following arguments are required: run_dir") and err.count("\n") == 1


def test_console_command_lists_commands_without_importing_torch():
    probe = "import sys, neobert_cli; sys.argv = ['neobert', '--help']; neobert_cli.main(); print(sorted(m for m in ('torch', 'transformers', 'neobert') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    *usage, imported = proc.stdout.splitlines()
    assert imported == "[]"
    assert [line.split()[0] for line in usage if line.startswith("  ")] == list(COMMANDS)


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("interrupted")
    assert (final / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(final, replace=False, sync=True) as tmp:  # another writer finished first: its copy stays
        (tmp / "a").write_text("3")
    assert (final / "a").read_text() == "1"
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("4")
    assert sorted(p.name for p in final.iterdir() if not p.name.startswith(".")) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
