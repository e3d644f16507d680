"""``neobert pretrain``: stage-1 masked-LM pretraining with the paper's recipe.

One loop for a laptop CPU and for many GPUs under ``torchrun``: each optimizer step reads
a fixed set of packed rows (a pure function of the step, so resume is exact and every
rank reads its own shard), masks them deterministically, accumulates gradients over
micro-batches, clips, and steps AdamW on the warmup + cosine schedule. Checkpoints are
atomic; ``train.resume=auto`` continues from the newest one.

    neobert pretrain configs/tiny.yaml train.max_steps=200 train.output_dir=runs/x
    torchrun --nproc_per_node=8 -m neobert pretrain configs/neobert-base.yaml
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from neobert import rundir, validate
from neobert.config import load_config, save_config, split_args, to_dict
from neobert.data import DataConfig, LengthMixtureRows, MLMMasker, PackedRows, collate, prepare_corpus
from neobert.errors import UserError
from neobert.modeling_neobert import NeoBERTConfig, NeoBERTForMaskedLM
from neobert.tokenizer import load_tokenizer
from neobert.train import common


@dataclass
class ModelArgs:
    """The model to train (NeoBERTConfig fields; vocabulary and padding come from the tokenizer)."""

    hidden_size: int = 768
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # nominal; SwiGLU uses round8(2/3 of it)
    max_length: int = 1024  # recorded in the config; the rows' length is data.max_length
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    embedding_init_range: float = 0.02
    decoder_init_range: float = 0.02
    tie_word_embeddings: bool = False  # share the MLM decoder weight with the input embedding (released NeoBERT: untied)
    init_from: str | None = None  # start from these weights: a run dir (its final/ or newest checkpoint) or a HF model dir
    init_optimizer: bool = False  # with init_from: continue its AdamW state too (from its newest checkpoint)
    hf_config: str | None = None  # train a transformers masked-LM from this config.json instead (e.g. a BERT, for comparisons)

    def __post_init__(self):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_length"):
            validate.positive(f"model.{key}", getattr(self, key))
        for key in ("norm_eps", "rope_theta", "embedding_init_range", "decoder_init_range"):
            validate.positive(f"model.{key}", getattr(self, key))
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"model.num_attention_heads={self.num_attention_heads} does not divide model.hidden_size={self.hidden_size}")


@dataclass
class TrainArgs:
    """Optimisation, schedule, checkpoints and logging."""

    output_dir: str = "runs/pretrain"
    max_steps: int = 1_000_000
    seed: int = 0
    batch_tokens: int = 2_097_152  # global batch in tokens: rows per step = batch_tokens // data.max_length
    micro_batch_size: int = 32  # rows per forward pass and process; accumulation makes up the rest
    lr: float = 6e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only, not norms or biases
    warmup_steps: int = 2000
    decay_fraction: float = 0.9  # cosine decay ends at this fraction of max_steps, then constant
    min_lr_ratio: float = 0.1  # floor of the decay, as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    bf16: bool | None = None  # bf16 autocast (fp32 master weights); None: where bf16 is native (CUDA, AVX512-BF16/AMX CPUs)
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # FSDP2 (fully_shard per block) instead of DDP when distributed
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda
    save_every: int = 1000  # steps between checkpoints (a checkpoint is also written at the end)
    keep_checkpoints: int = 2  # newest K kept
    resume: str = "auto"  # auto: newest complete checkpoint in output_dir | none | a checkpoint path
    eval_every: int = 500  # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 16  # held-out micro-batches per evaluation
    log_every: int = 10
    overwrite: bool = False  # output_dir holds something else (an earlier run, other files): replace neobert's files in it

    def __post_init__(self):
        for key in ("max_steps", "batch_tokens", "micro_batch_size", "lr", "eps", "save_every", "eval_batches", "log_every"):
            validate.positive(f"train.{key}", getattr(self, key))
        for key in ("weight_decay", "warmup_steps", "grad_clip", "keep_checkpoints", "eval_every"):
            validate.non_negative(f"train.{key}", getattr(self, key))
        validate.in_range("train.decay_fraction", self.decay_fraction, 0, 1)
        validate.in_range("train.min_lr_ratio", self.min_lr_ratio, 0, 1)
        if len(self.betas) != 2:
            raise UserError(f"train.betas={self.betas} must be two numbers")
        for beta in self.betas:
            validate.in_range("train.betas", beta, 0, 1, high_open=True)
        validate.device("train.device", self.device)
        if not str(self.resume).strip():
            raise UserError("train.resume is empty: use auto, none or a checkpoint directory")


@dataclass
class PretrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainArgs = field(default_factory=TrainArgs)


# ---------------------------------------------------------------------------------------


def build_model(args: ModelArgs, tokenizer) -> torch.nn.Module:
    """A fresh NeoBERTForMaskedLM sized for the tokenizer, or a transformers MLM from hf_config."""
    if args.hf_config:
        from transformers import AutoConfig, AutoModelForMaskedLM

        if not Path(args.hf_config).exists():
            raise UserError(f"model.hf_config: file not found: {args.hf_config}")
        hf = AutoConfig.from_pretrained(args.hf_config)
        if hf.vocab_size < len(tokenizer):
            raise UserError(f"{args.hf_config}: vocab_size {hf.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
        return AutoModelForMaskedLM.from_config(hf)
    fields = {k: v for k, v in vars(args).items() if k not in ("init_from", "init_optimizer", "hf_config")}
    cfg = NeoBERTConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **fields)
    model = NeoBERTForMaskedLM(cfg)
    if args.init_from:
        load_initial_weights(model, args.init_from)
    return model


def load_initial_weights(model: torch.nn.Module, source: str) -> None:
    """Copy weights from a run directory (final/, else its newest checkpoint) or a model directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(source)
    candidates = [path / "final" / "model.safetensors", path / "model.safetensors"]
    newest = common.latest_checkpoint(path)
    if newest is not None:
        candidates.insert(1, newest / "model.safetensors")
    file = next((c for c in candidates if c.exists()), None)
    if file is None:
        raise UserError(f"model.init_from={source}: no model.safetensors in it, its final/ or its checkpoints/")
    try:
        missing, unexpected = model.load_state_dict(load_file(str(file)), strict=False)
    except RuntimeError as e:  # another shape: a smaller vocabulary, another width
        detail = next((line.strip() for line in str(e).splitlines()[1:] if "size mismatch" in line), str(e).splitlines()[0])
        raise UserError(f"model.init_from={source}: its weights do not fit this model ({detail}; the tokenizer has {model.config.vocab_size} tokens)") from None
    except SafetensorError as e:
        raise UserError(f"model.init_from={source}: cannot read {file} ({str(e).splitlines()[0]})") from None
    if missing or unexpected:
        raise UserError(f"model.init_from={source}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_initial_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, source: str, args: TrainArgs) -> None:
    """Continue the AdamW state of ``source`` (a checkpoint, or a run directory's newest one).

    Its moments carry over; the hyper-parameters stay this run's, not the checkpoint's.
    """
    if not source:
        raise UserError("model.init_optimizer=true needs model.init_from")
    path = Path(source)
    checkpoint = path if (path / "optimizer.pt").exists() else common.latest_checkpoint(path)
    if checkpoint is None:
        raise UserError(f"model.init_optimizer: {source} holds no checkpoint with optimizer state (optimizer.pt)")
    common.load_checkpoint(checkpoint, model, optimizer)  # its weights are init_from's final ones
    decay, no_decay = optimizer.param_groups
    decay["weight_decay"], no_decay["weight_decay"] = args.weight_decay, 0.0
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = tuple(args.betas), args.eps


def check_same_model(checkpoint: Path, cfg: PretrainConfig) -> None:
    """Resuming needs the model the checkpoint holds: name every architecture key that differs."""
    try:
        saved = json.loads((checkpoint / "state.json").read_text()).get("config", {}).get("model", {})
    except (OSError, ValueError):
        return  # load_checkpoint names the unreadable file
    now = to_dict(cfg.model)
    keys = [k for k in now if k not in ("init_from", "init_optimizer") and k in saved and saved[k] != now[k]]
    if keys:
        changes = ", ".join(f"model.{k}={saved[k]} there, {now[k]} now" for k in keys)
        raise UserError(f"{checkpoint} holds another model ({changes}): resume with its config, or use another train.output_dir (or train.overwrite=true)")


def check_vocab(model: torch.nn.Module, tokenizer) -> None:
    vocab = model.config.vocab_size
    if vocab < len(tokenizer) or tokenizer.mask_token_id is None:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens (mask id {tokenizer.mask_token_id}) but the model's vocab_size is {vocab}")


def wrap_model(model: torch.nn.Module, args: TrainArgs, d: common.Dist) -> torch.nn.Module:
    model.to(d.device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if d.world > 1:
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.base_model.transformer_encoder if hasattr(model.base_model, "transformer_encoder") else []:
                fully_shard(block)
            fully_shard(model)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    return model


def model_inputs(batch: dict, is_neobert: bool, device: torch.device) -> dict:
    """NeoBERT takes document-id masks and positions; other models a 0/1 mask only."""
    if is_neobert:
        keys = ("input_ids", "attention_mask", "position_ids", "labels")
        return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": (batch["attention_mask"] > 0).long().to(device),
        "labels": batch["labels"].to(device),
    }


def no_sync(model: torch.nn.Module, skip: bool):
    """DDP's no_sync for all but the last micro-batch of a step (no-op elsewhere)."""
    ddp = getattr(model, "_orig_mod", model)
    return ddp.no_sync() if skip and hasattr(ddp, "no_sync") else nullcontext()


def heldout_batches(rows: PackedRows, masker: MLMMasker, cfg: PretrainConfig, rank: int = 0, world: int = 1):
    """The fixed held-out evaluation batches (same rows and masks every time), this rank's share."""
    mb = cfg.train.micro_batch_size
    n_batches = min(cfg.train.eval_batches, max(1, math.ceil(len(rows) / mb)))
    for i in range(rank, n_batches, world):
        idx = [j % len(rows) for j in range(i * mb, (i + 1) * mb)]
        yield masker(collate(rows.rows(idx), cfg.data.packing, cfg.data.max_length), seed=12345, step=i)


@torch.no_grad()
def evaluate(model, heldout_rows: PackedRows, masker: MLMMasker, cfg: PretrainConfig, d: common.Dist, is_neobert: bool) -> dict:
    """Held-out MLM loss and masked-token accuracy on a fixed set of batches (same masks every time)."""
    model.eval()
    loss_sum = correct = count = 0.0
    for batch in heldout_batches(heldout_rows, masker, cfg, d.rank, d.world):
        inputs = model_inputs(batch, is_neobert, d.device)
        labels = inputs["labels"]
        with common.autocast(d.device, cfg.train.bf16):
            logits = model(**inputs).logits.float()  # NeoBERT decodes only the masked positions
        if logits.dim() == 3:
            logits = logits[labels != -100]
        target = labels[labels != -100]
        loss_sum += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    loss_sum, correct, count = d.all_sum(loss_sum), d.all_sum(correct), d.all_sum(count)
    model.train()
    return {"eval_loss": loss_sum / max(count, 1), "eval_accuracy": correct / max(count, 1), "eval_tokens": int(count)}


def run(cfg: PretrainConfig) -> Path:
    """Train to ``train.max_steps``; returns the final Hugging Face model directory."""
    a = cfg.train
    d = common.setup_distributed(a.device)
    run_dir = common.open_run(a.output_dir, "pretrain", a.resume, a.overwrite, d)  # before any data is read
    out = run_dir.path
    rows_per_step = a.batch_tokens // cfg.data.max_length
    per_rank, rem = divmod(rows_per_step, d.world)
    if rows_per_step == 0 or rem or per_rank % a.micro_batch_size:
        raise UserError(
            f"train.batch_tokens={a.batch_tokens} gives {rows_per_step} rows of data.max_length={cfg.data.max_length}: "
            f"it must be a multiple of train.micro_batch_size={a.micro_batch_size} x {d.world} processes"
        )
    accumulation = per_rank // a.micro_batch_size

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if d.main:  # rank 0 tokenizes (or finds the cache) first, the others then read the cache
        train_corpus, heldout_corpus = prepare_corpus(cfg.data, tokenizer)
    d.barrier()
    if not d.main:
        train_corpus, heldout_corpus = prepare_corpus(cfg.data, tokenizer)
    if cfg.data.bucket_thresholds is None:
        rows = PackedRows(train_corpus, cfg.data.max_length, cfg.data.packing, a.seed)
    else:  # stage 2: each row from a length bucket (the held-out evaluation stays on every document)
        rows = LengthMixtureRows(train_corpus, cfg.data.max_length, cfg.data.packing, a.seed, cfg.data.bucket_thresholds, cfg.data.bucket_probabilities)
    heldout_rows = PackedRows(heldout_corpus, cfg.data.max_length, cfg.data.packing, seed=0)

    common.seed_everything(a.seed)
    model = build_model(cfg.model, tokenizer)
    check_vocab(model, tokenizer)
    is_neobert = isinstance(model, NeoBERTForMaskedLM)
    if not is_neobert and cfg.data.packing == "document":
        raise UserError("model.hf_config models take no document masks: set data.packing=none or naive")
    flops_per_token = 3 * model.config.flops_per_token(cfg.data.max_length) if is_neobert else None
    model = wrap_model(model, a, d)
    optimizer = common.build_optimizer(model, a.lr, a.weight_decay, tuple(a.betas), a.eps)

    resume_from = common.resolve_resume(a.resume, run_dir, d)
    state = {"step": 0, "tokens": 0}
    if resume_from is not None:
        check_same_model(resume_from, cfg)
        state = common.load_checkpoint(resume_from, model, optimizer)
    elif cfg.model.init_optimizer:
        load_initial_optimizer(model, optimizer, cfg.model.init_from, a)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    logger = common.MetricsLogger(out, d.main, resume_step=state["step"] if resume_from else None)

    masker = MLMMasker(tokenizer, rate=cfg.data.mlm_rate, mask_80_10_10=cfg.data.mask_80_10_10)
    peak = common.peak_flops(d.device)
    step, tokens = state["step"], state["tokens"]
    if d.main:
        n_params = sum(p.numel() for p in common.unwrap(model).parameters())
        print(f"model {n_params / 1e6:.1f}M parameters | {len(train_corpus)} train documents, {len(rows)} rows of "
              f"{cfg.data.max_length} per epoch | {rows_per_step} rows per step ({accumulation} x {a.micro_batch_size} x {d.world}) | "
              f"{'bf16 autocast' if common.use_bf16(a.bf16, d.device) else 'fp32'}"
              + (f" | resumed from {resume_from}" if resume_from else ""))

    model.train()
    bar = tqdm(total=a.max_steps, initial=step, disable=not d.main, desc="pretrain", dynamic_ncols=True)
    speed = common.Throughput()
    while step < a.max_steps:
        lr = common.lr_at(step, a.lr, a.warmup_steps, a.max_steps, a.decay_fraction, a.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        first = step * rows_per_step + d.rank * per_rank
        micro = []
        for m in range(accumulation):
            idx = list(range(first + m * a.micro_batch_size, first + (m + 1) * a.micro_batch_size))
            batch = collate(rows.rows(idx), cfg.data.packing, cfg.data.max_length)
            # masks keyed by the global micro-batch index: the same whatever the number of processes
            micro.append(masker(batch, seed=a.seed, step=step, micro=d.rank * accumulation + m))
        # every masked token of the global batch weighs the same, however it is split
        n_masked = d.all_sum(float(sum(int((b["labels"] != -100).sum()) for b in micro)))
        step_loss, step_tokens = 0.0, 0
        for m, batch in enumerate(micro):
            inputs = model_inputs(batch, is_neobert, d.device)
            n = int((inputs["labels"] != -100).sum())
            with no_sync(model, m < accumulation - 1), common.autocast(d.device, a.bf16):
                loss = model(**inputs).loss
                (loss * n * d.world / max(n_masked, 1)).backward()  # DDP averages over ranks: undo with world
            step_loss += loss.item() * n
            step_tokens += int((batch["attention_mask"] > 0).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip if a.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_tokens = int(d.all_sum(step_tokens))
        tokens += step_tokens
        speed.add(step_tokens)
        loss_value = d.all_sum(step_loss) / max(n_masked, 1)
        bar.update(1)

        if step % a.log_every == 0 or step == a.max_steps:
            tps = speed.rate()
            record = {"step": step, "loss": loss_value, "lr": lr, "tokens": tokens, "tokens_per_s": tps, "grad_norm": float(grad_norm)}
            if flops_per_token:
                record["tflops"] = tps * flops_per_token / 1e12
                if peak:
                    record["mfu"] = tps * flops_per_token / (peak * d.world)
            logger.log(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        if (a.eval_every and step % a.eval_every == 0) or step == a.max_steps:
            result = evaluate(model, heldout_rows, masker, cfg, d, is_neobert)
            logger.log({"step": step, **result})
            if d.main:
                bar.write(f"step {step}: held-out loss {result['eval_loss']:.3f}, masked-token accuracy {result['eval_accuracy']:.2%}")
        if step % a.save_every == 0 or step == a.max_steps:
            common.save_checkpoint(out, step, model, optimizer, {"tokens": tokens, "rows_seen": step * rows_per_step, "config": to_dict(cfg)}, a.keep_checkpoints, d, run_dir.run_id)
    bar.close()
    common.export_final(model, tokenizer, out / "final", d)
    logger.close()
    if d.main:
        print(f"done: {step} steps, {tokens:,} tokens; model in {out / 'final'}")
    common.teardown_distributed()
    return out / "final"


def main(argv: list[str]) -> int:
    path, overrides = split_args(argv)
    cfg = load_config(PretrainConfig, path, overrides)
    run(cfg)
    return 0


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a torn last line is dropped with a warning)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    return rundir.read_jsonl_records(path)
