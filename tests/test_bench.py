"""`neobert bench`: FLOP closed forms against torch's counter, batches, a tiny smoke run."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

from neobert import NeoBERTConfig
from neobert.bench import TINY, Batch, batch_flops, draw_lengths, flops_per_token, head_flops, main, make_batch
from neobert.cli import main as cli_main
from neobert.errors import UserError

PEERS = [
    (BertConfig, BertForMaskedLM, TINY),
    (ModernBertConfig, ModernBertForMaskedLM, dict(TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
]


@pytest.mark.parametrize("config_cls, model_cls, shape", PEERS, ids=["bert", "modernbert"])
def test_peer_flops_match_flop_counter(config_cls, model_cls, shape):
    """Closed forms equal torch's FLOP counter on the peers' eager attention (explicit
    matmuls, which the counter sees; ModernBERT's local layers compute full scores too)."""
    config = config_cls(**shape)
    model = model_cls._from_config(config, attn_implementation="eager").eval()
    B, L = 2, 48
    ids = torch.randint(5, 1000, (B, L))
    for decode, module in ((False, model.base_model), (True, model)):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            module(input_ids=ids)
        expected = flops_per_token(config, L) + (head_flops(config) if decode else 0)
        assert counter.get_total_flops() == expected * B * L


def test_neobert_head_flops_agree_with_its_config():
    cfg = NeoBERTConfig(**TINY)
    assert head_flops(cfg) == cfg.flops_per_token(64, include_head=True) - cfg.flops_per_token(64)
    assert flops_per_token(cfg, 64) == cfg.flops_per_token(64)


def test_issue_flop_figures_of_the_peers():
    """ModernBERT-base 0.26 / 0.50 and BERT-base 0.19 / 0.32 GFLOPs per token at 512 / 4096."""
    for config, figures in ((ModernBertConfig(), (0.26, 0.50)), (BertConfig(), (0.19, 0.32))):
        assert tuple(round(flops_per_token(config, n) / 1e9, 2) for n in (512, 4096)) == figures


def test_variable_lengths_are_seeded_and_bounded():
    a, b = draw_lengths("variable", 512, 16, seed=3, doc_lengths=None), draw_lengths("variable", 512, 16, seed=3, doc_lengths=None)
    assert a == b and len(a) == 16 and all(8 <= n <= 512 for n in a) and len(set(a)) > 8
    assert draw_lengths("fixed", 512, 3, seed=3, doc_lengths=None) == [512] * 3
    from_docs = draw_lengths("variable", 100, 50, seed=0, doc_lengths=torch.tensor([20, 700]).numpy())
    assert set(from_docs) == {20, 100}  # documents longer than the row are cut to it


def test_batch_and_training_flops():
    batch = make_batch([10, 4], seed=0)
    assert isinstance(batch, Batch) and batch.input_ids.shape == (2, 10) and batch.tokens == 14
    assert batch.attention_mask.sum() == 14 and (batch.input_ids[1, 4:] == 0).all()
    assert (batch.labels[batch.attention_mask == 0] == -100).all()
    cfg = NeoBERTConfig(**TINY)
    forward = 10 * cfg.flops_per_token(10) + 4 * cfg.flops_per_token(4)
    assert batch_flops(cfg, batch, train=False, decodes_all=False) == forward
    decoded = int((batch.labels != -100).sum())
    assert batch_flops(cfg, batch, train=True, decodes_all=False) == 3 * (forward + decoded * head_flops(cfg))
    assert batch_flops(cfg, batch, train=True, decodes_all=True) == 3 * (forward + 14 * head_flops(cfg))


def test_bench_smoke_run_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "rows.json", tmp_path / "plot.png"
    argv = ["--tiny", "--seq-lens", "16", "--dtype", "fp32", "--mode", "inference,train", "--warmup", "0", "--iters", "1"]
    assert main(argv + ["--batch-tokens", "32", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 4 * 2 * 2  # models x modes x lengths kinds
    keys = {"model", "seq_len", "batch_size", "dtype", "mode", "lengths", "tokens_per_s", "flops_per_token", "mfu", "peak_mem_mb"}
    for r in rows:
        assert keys <= r.keys()
        assert r["tokens_per_s"] > 0 and r["flops_per_token"] > 0 and r["mfu"] > 0 and r["dtype"] == "fp32" and r["seq_len"] == 16
        assert set(r["ratios"]) == {o["model"] for o in rows} - {r["model"]}
    assert {(r["mode"], r["lengths"]) for r in rows} == {(m, k) for m in ("inference", "train") for k in ("fixed", "variable")}
    assert all(r["batch_size"] == 2 for r in rows if r["lengths"] == "fixed") and all(r["batch_size"] == 4 for r in rows if r["lengths"] == "variable")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "modernbert-base" in capsys.readouterr().out


def test_bench_profile_reports_time_shares(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--tiny", "--seq-lens", "16", "--dtype", "fp32", "--models", "neobert-base,bert-base", "--lengths", "fixed"]
    argv += ["--warmup", "0", "--iters", "1", "--batch-tokens", "32", "--profile", "--json", str(out), "--plot", str(tmp_path / "p.png")]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2
    for r in rows:
        t = r["time_shares"]
        assert t["matmul"] > 0 and t["attention"] > 0 and t["other"] > 0
        assert abs(t["matmul"] + t["attention"] + t["other"] - 1) < 1e-9
        assert len(t["top_ops"]) == 5 and all(0 < v <= 1 for v in t["top_ops"].values())
    assert "where one step's time goes" in capsys.readouterr().out


def test_attention_ops_exclude_the_loss_log_softmax():
    from neobert.bench import is_attention_op

    attention = ["aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_softmax", "aten::_softmax_backward_data"]
    other = ["aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::mm", "aten::mul"]
    assert all(map(is_attention_op, attention)) and not any(map(is_attention_op, other))


def test_bad_arguments_are_user_errors(capsys):
    assert cli_main(["bench", "--seq-lens", "4"]) == 2
    assert "--seq-lens" in capsys.readouterr().err
    with pytest.raises(UserError, match="--models"):  # the shared ArgumentParser: one line, no SystemExit
        main(["--models", "gpt2"])


def test_no_png_without_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--tiny", "--models", "neobert-base", "--seq-lens", "16", "--dtype", "fp32", "--lengths", "fixed", "--warmup", "0", "--iters", "1"]
    assert main(argv + ["--batch-tokens", "32", "--json", "rows.json"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]


def test_lengths_past_berts_position_table_skip_its_rows(tmp_path, capsys):
    """--seq-lens 16384: bert-base (8192 learned positions) is skipped with one line saying why,
    the other models' rows run; a grid with nothing left to run is a one-line error."""
    from neobert.bench import build, position_limit

    assert position_limit(build("bert-base", tiny=True)) == 8192
    assert position_limit(build("neobert-base", tiny=True)) is None and position_limit(build("modernbert-base", tiny=True)) is None
    out = tmp_path / "rows.json"
    argv = ["--tiny", "--models", "bert-base", "--dtype", "fp32", "--lengths", "fixed", "--warmup", "0", "--iters", "1", "--batch-tokens", "32"]
    assert main(argv + ["--seq-lens", "16,16384", "--json", str(out)]) == 0
    assert [(r["model"], r["seq_len"]) for r in json.loads(out.read_text())] == [("bert-base", 16)]
    assert "bert-base skipped at length 16384: its learned position table has 8192 entries" in capsys.readouterr().out
    with pytest.raises(UserError, match="no row to measure: bert-base cannot run --seq-lens 16384"):
        main(argv + ["--seq-lens", "16384"])
