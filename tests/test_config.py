"""Config loading: every YAML in configs/ parses into its command's dataclasses; overrides are typed."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from neobert.config import load_config, split_args
from neobert.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED = ROOT.parent / "shared"  # GLUE and STS files; CI has them, a bare checkout may not


def config_class(path: Path):
    """The command whose config a YAML file is, by its name."""
    name = path.stem
    if name.startswith("glue") or name.startswith("finetune"):
        from neobert.train.finetune import FinetuneConfig

        return FinetuneConfig
    if name.startswith("contrastive"):
        from neobert.train.contrastive import ContrastiveConfig

        return ContrastiveConfig
    if "extend" in name or name.endswith("-4096"):  # stage 2
        from neobert.train.extend import ExtendConfig

        return ExtendConfig
    from neobert.train.pretrain import PretrainConfig


    return PretrainConfig


# stage-2 config -> the stage-1 config whose run it extends
STAGE1 = {"tiny-extend.yaml": "tiny.yaml", "neobert-base-4096.yaml": "neobert-base.yaml"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_resolves_as_its_command_would(path, tmp_path, monkeypatch):
    """Each config loads into its command's dataclasses and passes the checks its command makes
    before training: the batch layout divides, the model builds for the tokenizer, its data
    source and files exist, an extension resolves against a stage-1 model of the stage-1
    config's architecture, contrastive datasets and the fine-tuning grid are well-formed."""
    monkeypatch.chdir(ROOT)  # configs name files relative to the checkout (../shared, configs/...)
    cls = config_class(path)
    cfg = load_config(cls, path)
    if cls.__name__ == "ExtendConfig":
        cfg = resolve_extension(cfg, path, tmp_path)
    if type(cfg).__name__ == "PretrainConfig":
        check_pretraining(cfg, path)
    elif cls.__name__ == "ContrastiveConfig":
        check_contrastive(cfg)
    else:
        check_finetuning(cfg)


def check_pretraining(cfg, path: Path) -> None:
    import torch

    from neobert import NeoBERTForMaskedLM
    from neobert.data.sources import describe_source
    from neobert.tokenizer import load_tokenizer
    from neobert.train import pretrain
    from neobert.train.common import Dist

    layout = pretrain.batch_layout(cfg, Dist())
    assert layout.accumulation * cfg.train.micro_batch_size == layout.rows_per_step
    source = cfg.data.source
    if source.startswith("/") and not Path(source).exists():  # a prepared corpus on a cluster's shared file system
        assert f"prepare.output={source}" in path.read_text(), f"{path.name}: its comments must say how {source} is prepared"
        assert cfg.data.max_documents is None, "a prepared corpus takes data.max_documents when prepared, not when read"
    else:
        describe_source(cfg.data)  # the built-in corpus's packages are installed, local files exist
        assert not source.startswith("hf:") or cfg.data.max_documents, "a streamed hub source needs data.max_documents"
    tokenizer = load_tokenizer(cfg.data.tokenizer, model_max_length=cfg.data.max_length)
    with torch.device("meta"):  # shapes only
        model = pretrain.build_model(dataclasses.replace(cfg.model, init_from=None), tokenizer)
    pretrain.check_vocab(model, tokenizer)
    assert isinstance(model, NeoBERTForMaskedLM) or cfg.data.packing != "document"  # only NeoBERT takes document masks


def resolve_extension(cfg, path: Path, tmp_path: Path):
    """``extend.resolve`` against a stage-1 run of the config's stage-1 recipe (config only)."""
    from neobert import NeoBERTConfig
    from neobert.tokenizer import load_tokenizer
    from neobert.train import extend, pretrain

    stage1 = load_config(pretrain.PretrainConfig, CONFIGS / STAGE1[path.name])
    assert cfg.model.init_from in (stage1.train.output_dir, "runs/demo")  # its run directory (make demo's for tiny.yaml)
    assert (cfg.data.source, cfg.data.tokenizer) == (stage1.data.source, stage1.data.tokenizer)
    assert cfg.data.max_length > stage1.data.max_length
    architecture = {k: getattr(stage1.model, k) for k in extend.ARCHITECTURE}
    tokenizer = load_tokenizer(stage1.data.tokenizer)
    NeoBERTConfig(vocab_size=len(tokenizer), max_length=stage1.data.max_length, **architecture).save_pretrained(tmp_path / "stage1" / "final")
    cfg.model.init_from = str(tmp_path / "stage1")
    resolved = extend.resolve(cfg)
    assert {k: getattr(resolved.model, k) for k in extend.ARCHITECTURE} == architecture
    assert resolved.model.max_length == resolved.data.max_length == cfg.data.max_length
    return resolved


def check_contrastive(cfg) -> None:
    from neobert.config import from_dict
    from neobert.data.pairs import DatasetArgs, load_pairs
    from neobert.eval.sts import read_sts

    specs = [from_dict(DatasetArgs, spec, "data.datasets", f"data.datasets[{i}].") for i, spec in enumerate(cfg.data.datasets)]
    assert specs and cfg.train.batch_size > 0 and cfg.loss.temperature > 0
    for spec in specs:
        if spec.path.startswith("builtin:"):  # read as the command reads it; hub datasets need the hub
            assert len(load_pairs(spec, cfg.loss.hard_negatives).rows) >= cfg.train.batch_size
        elif not spec.path.startswith("hf:"):
            assert Path(spec.path).exists(), spec.path
    if cfg.train.eval_sts and SHARED.is_dir():
        assert len(read_sts(cfg.train.eval_sts)[2]) > 0


def check_finetuning(cfg) -> None:
    from neobert.models import resolve_model
    from neobert.train.finetune import load_data
    from neobert.train.glue import grid_points

    assert cfg.train.batch_size % cfg.train.grad_accum == 0
    assert all(bs % cfg.train.grad_accum == 0 for bs, _, _ in grid_points(cfg))
    if cfg.model.name:
        resolve_model(cfg.model.name)
    if cfg.data.train and SHARED.is_dir():
        data = load_data(cfg)
        assert len(data.train) > 0 and (cfg.data.labels is None or data.num_labels == len(cfg.data.labels))


def test_base_config_is_the_paper_recipe():
    from neobert.train.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, CONFIGS / "neobert-base.yaml")
    m, t = cfg.model, cfg.train
    assert (m.num_hidden_layers, m.hidden_size, m.num_attention_heads) == (28, 768, 12)
    assert cfg.data.max_length == 1024 and t.batch_tokens // cfg.data.max_length == 2048
    assert (t.max_steps, t.lr, t.warmup_steps, t.betas, t.weight_decay, t.grad_clip) == (1_000_000, 6e-4, 2000, [0.9, 0.95], 0.1, 1.0)
    assert (cfg.data.mlm_rate, cfg.data.mask_80_10_10, t.min_lr_ratio, t.decay_fraction) == (0.2, False, 0.1, 0.9)


@dataclass
class Inner:
    steps: int = 1
    lr: float = 1e-3
    name: str = "x"
    flag: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    maybe: int | None = None


@dataclass
class Outer:
    train: Inner = field(default_factory=Inner)


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n  lr: 6e-4\n")
    cfg = load_config(Outer, path, ["train.steps=7", "train.flag=true", "train.betas=[0.8,0.9]", "train.maybe=null", "train.name=42"])
    assert cfg.train.steps == 7 and cfg.train.lr == 6e-4 and cfg.train.flag is True
    assert cfg.train.betas == [0.8, 0.9] and cfg.train.maybe is None and cfg.train.name == "42"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown key 'train.stepz'; valid keys: train.steps, train.lr"),
        ("train.steps=3.5", "train.steps must be an integer"),
        ("train.flag=maybe", "train.flag must be true or false"),
        ("train.lr=fast", "train.lr must be a number"),
        ("nokey", "not key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(Outer, None, [override])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 5\n  lr: [1,\n")
    with pytest.raises(UserError, match=r"bad\.yaml line \d+"):
        load_config(Outer, path)
    with pytest.raises(UserError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_split_args():
    assert split_args(["c.yaml", "a.b=1"]) == ("c.yaml", ["a.b=1"])
    with pytest.raises(UserError):
        split_args(["a.yaml", "b.yaml"])


# The paper's Table 7 (arXiv 2502.19587, Appendix D.3), by dataset.
TABLE_7 = {
    "allnli": "Given a premise, retrieve a hypothesis that is entailed by the premise.",
    "githubissue": "Given a question, retrieve questions from Github that are duplicates to the given question.",
    "gooaq": "Given a question, retrieve relevant documents that best answer the question.",
    "pubmedqa": "Given a medical question, retrieve documents that best answer the question.",
    "stackexchange": "Given a Stack Exchange post, retrieve posts that are duplicates to the given post.",
    "sts12": "Retrieve semantically similar text.",
    "stsbenchmark": "Retrieve semantically similar text.",
    "triviaqa": "Given a question, retrieve documents that answer the question.",
    "wikihow": "Given a Wikihow post, retrieve titles that best summarize the post.",
}


def test_contrastive_config_is_the_papers_appendix_d():
    from neobert.config import from_dict
    from neobert.train.contrastive import ContrastiveConfig, DatasetArgs

    cfg = load_config(ContrastiveConfig, CONFIGS / "contrastive.yaml")
    assert (cfg.data.sampling_power, cfg.train.max_steps, cfg.loss.temperature, cfg.model.pooling) == (0.5, 2000, 0.07, "mean")
    # Each entry as `neobert contrastive` reads it (unknown keys are errors there too).
    specs = [from_dict(DatasetArgs, spec, "data.datasets", f"data.datasets[{i}].") for i, spec in enumerate(cfg.data.datasets)]
    seen = set()
    for spec in specs:
        dataset = spec.name.split("-")[0]  # stackexchange-body, stackexchange-post: one dataset in the paper
        assert spec.path.startswith("hf:") and spec.query_instruction == TABLE_7[dataset] + " " and spec.document_instruction == ""
        seen.add(dataset)
    assert seen == set(TABLE_7)
    assert all(s.min_score == 4.0 for s in specs if s.name.startswith("sts"))
