"""``neobert pretrain``: stage-1 masked-LM pretraining with the paper's recipe.

One loop for a laptop CPU and for many GPUs under ``torchrun``: each optimizer step reads
a fixed set of packed rows (a pure function of the step, so resume is exact and every
rank reads its own shard), masks them deterministically, accumulates gradients over
micro-batches, clips, and steps AdamW on the warmup + cosine schedule. Checkpoints are
atomic; ``train.resume=auto`` continues from the newest one.

``run`` reads top to bottom: setup (processes, batch layout) -> data -> model and
optimizer -> the loop (:mod:`neobert.train.loop`) -> export of ``final/``.

    neobert pretrain configs/tiny.yaml train.max_steps=200 train.output_dir=runs/x
    torchrun --nproc_per_node=8 -m neobert pretrain configs/neobert-base.yaml
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neobert import validate
from neobert.config import command_config, to_dict
from neobert.data import DataConfig, LengthMixtureRows, MLMMasker, PackedRows, collate, prepare_corpus
from neobert.data.corpus import open_prepared_corpus, uses_prepared
from neobert.data.loader import MicroBatches, micro_batch_loader, model_inputs
from neobert.data.mixture import ShardedMixtureRows
from neobert.data.sharded import ShardedRows
from neobert.data.packing import Rows
from neobert.device import attention_implementation, autocast, use_bf16
from neobert.errors import UserError
from neobert.modeling_neobert import NeoBERTConfig, NeoBERTForMaskedLM
from neobert.tokenizer import load_tokenizer
from neobert.train import common, loop
from neobert.train.args import LoopArgs
from neobert.train.optim import build_optimizer


@dataclass
class ModelArgs:
    """The model to train (NeoBERTConfig fields; vocabulary and padding come from the tokenizer)."""

    hidden_size: int = 768
    """Width of the encoder."""
    num_hidden_layers: int = 28
    """Encoder blocks."""
    num_attention_heads: int = 12
    """Attention heads per block (hidden_size / heads is the head size)."""
    intermediate_size: int = 3072
    """Nominal FFN size; SwiGLU uses 2/3 of it, rounded up to a multiple of 8."""
    max_length: int = 1024
    """Recorded in the model config; the rows' length is data.max_length."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    embedding_init_range: float = 0.02
    """Standard deviation of the embedding's initial weights."""
    decoder_init_range: float = 0.02
    """Standard deviation of the linear layers' initial weights."""
    tie_word_embeddings: bool = False
    """Share the MLM decoder weight with the input embedding (released NeoBERT: untied)."""
    init_from: str | None = None
    """Start from these weights: a run dir (its final/ or newest checkpoint) or a HF model dir."""
    init_optimizer: bool = False
    """With init_from: continue its AdamW state too (from its newest checkpoint)."""
    hf_config: str | None = None
    """Train a transformers masked-LM from this config.json instead (e.g. a BERT, for comparisons)."""

    def __post_init__(self):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_length",
                    "norm_eps", "rope_theta", "embedding_init_range", "decoder_init_range"):
            validate.positive(f"model.{key}", getattr(self, key))
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"model.num_attention_heads={self.num_attention_heads} does not divide model.hidden_size={self.hidden_size}")


@dataclass
class TrainArgs(LoopArgs):
    """Optimisation, schedule, checkpoints and logging (shared keys: :class:`LoopArgs`)."""

    output_dir: str = "runs/pretrain"
    batch_tokens: int = 2_097_152
    """Global batch in tokens: rows per step = batch_tokens // data.max_length."""
    micro_batch_size: int = 32
    """Rows per forward pass and process; gradient accumulation makes up the rest."""
    compile: bool = False
    """torch.compile the model."""
    fsdp: bool = False
    """FSDP2 (fully_shard per block) instead of DDP when distributed."""
    eval_batches: int = 16
    """Held-out micro-batches per evaluation."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("batch_tokens", "micro_batch_size", "eval_batches"):
            validate.positive(f"train.{key}", getattr(self, key))

    def rows_per_step(self, max_length: int) -> int:
        return self.batch_tokens // max_length


@dataclass
class PretrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainArgs = field(default_factory=TrainArgs)


@dataclass
class BatchLayout:
    """How one optimizer step's rows split over processes and micro-batches."""

    rows_per_step: int
    per_rank: int
    accumulation: int


def main(argv: list[str]) -> int:
    run(command_config(PretrainConfig, argv, "neobert pretrain", __doc__.split("\n\n")[0]))
    return 0


def run(cfg: PretrainConfig) -> Path:
    """Train to ``train.max_steps``; returns the final Hugging Face model directory."""
    args = cfg.train
    dist = common.setup_distributed(args.device, args.dist_timeout_minutes)
    require_prepared(cfg.data, dist)  # before the run directory is touched
    run_dir = loop.claim(args, dist, "pretrain")  # before any data is read
    layout = batch_layout(cfg, dist)
    tokenizer = load_tokenizer(cfg.data.tokenizer, model_max_length=cfg.data.max_length)
    train_documents, rows, heldout_rows = build_data(cfg, tokenizer, dist)
    model, optimizer, is_neobert = build_model_and_optimizer(cfg, tokenizer, dist)
    flops_per_token = 3 * common.unwrap(model).config.flops_per_token(cfg.data.max_length) if is_neobert else None

    state, resumed_from, logger = loop.start(cfg, args, dist, model, optimizer, counters={"tokens": 0}, run=run_dir)
    if resumed_from is None and cfg.model.init_optimizer:
        load_initial_optimizer(model, optimizer, cfg.model.init_from, args)
    if dist.is_main:
        n_params = sum(p.numel() for p in common.unwrap(model).parameters())
        print(f"model {n_params / 1e6:.1f}M parameters | {train_documents} train documents, {len(rows)} rows of "
              f"{cfg.data.max_length} per epoch | {layout.rows_per_step} rows per step ({layout.accumulation} x "
              f"{args.micro_batch_size} x {dist.world}) | {'bf16 autocast' if use_bf16(args.bf16, dist.device) else 'fp32'}"
              + (f" | resumed from {resumed_from}" if resumed_from else ""))

    masker = MLMMasker(tokenizer, rate=cfg.data.mlm_rate, mask_80_10_10=cfg.data.mask_80_10_10)
    # the loader starts at the step the run starts from: resuming reads the very same batches
    batches = iter(micro_batch_loader(
        MicroBatches(rows, masker, cfg.data.packing, cfg.data.max_length, args.seed, args.micro_batch_size, layout.rows_per_step,
                     layout.accumulation, dist.rank, first_step=state["step"], max_steps=args.max_steps, flat=is_neobert),
        cfg.data.num_workers, cfg.data.prefetch_factor, dist.device))
    tokens = state["tokens"]
    model.train()

    def train_step(step: int) -> loop.StepResult:
        nonlocal tokens
        micro = [next(batches) for _ in range(layout.accumulation)]
        assert all(b["step"] == step for b in micro), "the loader and the loop disagree on the step"
        loss, step_tokens = mlm_step(model, micro, cfg, dist)
        tokens += step_tokens
        return loop.StepResult(loss, step_tokens, {"tokens": tokens})

    def evaluate_heldout(step: int) -> tuple[dict, str] | None:
        if heldout_rows is None:  # data.heldout_fraction=0: nothing held out
            return None
        result = evaluate(model, heldout_rows, masker, cfg, dist, is_neobert)
        return result, f"held-out loss {result['eval_loss']:.3f}, masked-token accuracy {result['eval_accuracy']:.2%}"

    def save(step: int, result: loop.StepResult) -> None:
        checkpoint_state = {**result.counters, "rows_seen": step * layout.rows_per_step, "config": to_dict(cfg)}
        common.save_checkpoint(run_dir.path, step, model, optimizer, checkpoint_state, args.keep_checkpoints, dist, run_dir.run_id)

    step = loop.run_loop(args, dist, optimizer, model.parameters(), state["step"], train_step, evaluate_heldout, save, logger,
                         desc="pretrain", flops_per_token=flops_per_token)
    final = run_dir.path / "final"
    common.export_final(model, tokenizer, final, dist)
    loop.finish(logger, dist, f"done: {step} steps, {tokens:,} tokens; model in {final}")
    return final


# ---------------------------------------------------------------------------------------
# Setup and data


def batch_layout(cfg: PretrainConfig, dist: common.Dist) -> BatchLayout:
    """Rows per step, per process and micro-batches per step; a UserError if they do not divide."""
    args = cfg.train
    rows_per_step = args.rows_per_step(cfg.data.max_length)
    per_rank, rem = divmod(rows_per_step, dist.world)
    if rows_per_step == 0 or rem or per_rank % args.micro_batch_size:
        raise UserError(
            f"train.batch_tokens={args.batch_tokens} gives {rows_per_step} rows of data.max_length={cfg.data.max_length}: "
            f"it must be a multiple of train.micro_batch_size={args.micro_batch_size} x {dist.world} processes"
        )
    return BatchLayout(rows_per_step, per_rank, per_rank // args.micro_batch_size)


def build_data(cfg: PretrainConfig, tokenizer, dist: common.Dist):
    """The number of training documents, their rows (packed, or from length buckets in stage 2) and
    the held-out rows (None when nothing is held out: ``data.heldout_fraction=0``).

    A prepared corpus (the built-in one too) is read shard by shard, its memory bounded
    whatever its size. Any other source goes through the single-file cache, which one process
    builds: with several processes that is refused, as the others would wait on it in a
    collective under the process group's timeout (and ranks of other nodes with node-local
    caches would build it again). The built-in corpus is prepared on first use by whichever
    process takes the cache's file lock first, the others waiting on the lock, not in a
    collective (``open_prepared_corpus``).
    """
    data = cfg.data
    if not uses_prepared(data):
        require_prepared(data, dist)
        train_corpus, heldout_corpus = prepare_corpus(data, tokenizer)
        if data.bucket_thresholds is None:
            rows = PackedRows(train_corpus, data.max_length, data.packing, cfg.train.seed)
        else:  # stage 2: each row from a length bucket (the held-out evaluation stays on every document)
            rows = LengthMixtureRows(train_corpus, data.max_length, data.packing, cfg.train.seed, data.bucket_thresholds, data.bucket_probabilities)
        heldout_rows = PackedRows(heldout_corpus, data.max_length, data.packing, seed=0) if heldout_corpus.num_tokens else None
        return len(train_corpus), rows, heldout_rows
    corpus = open_prepared_corpus(data, tokenizer, verbose=dist.is_main)
    if data.bucket_thresholds is None:
        rows = ShardedRows(corpus, data.max_length, data.packing, cfg.train.seed)
    else:
        rows = ShardedMixtureRows(corpus, data.max_length, data.packing, cfg.train.seed, data.bucket_thresholds, data.bucket_probabilities)
    heldout = ShardedRows(corpus, data.max_length, data.packing, seed=0, split="heldout") if corpus.manifest["heldout_tokens"] else None
    return rows.num_documents, rows, heldout


def require_prepared(data: DataConfig, dist: common.Dist) -> None:
    """With several processes, a source that is not a prepared corpus is refused (see ``build_data``)."""
    if dist.world > 1 and not uses_prepared(data):
        raise UserError(
            f"data.source={data.source} is not a prepared corpus: with {dist.world} processes, run "
            f"`neobert prepare data.source={data.source} prepare.output=DIR` first and train on data.source=DIR"
        )


# ---------------------------------------------------------------------------------------
# Model and optimizer


def build_model_and_optimizer(cfg: PretrainConfig, tokenizer, dist: common.Dist):
    """The model (seeded, checked against the tokenizer, wrapped for the processes) and its AdamW."""
    args = cfg.train
    common.seed_everything(args.seed)
    model = build_model(cfg.model, tokenizer, dist.device, use_bf16(args.bf16, dist.device))
    check_vocab(model, tokenizer)
    is_neobert = isinstance(model, NeoBERTForMaskedLM)
    if not is_neobert and cfg.data.packing == "document":
        raise UserError("model.hf_config models take no document masks: set data.packing=none, split or naive")
    model = wrap_model(model, args, dist)
    optimizer = build_optimizer(model, args.lr, args.weight_decay, tuple(args.betas), args.eps)
    return model, optimizer, is_neobert


def build_model(model_args: ModelArgs, tokenizer, device: torch.device | None = None, bf16: bool = False) -> torch.nn.Module:
    """A fresh NeoBERTForMaskedLM sized for the tokenizer, or a transformers MLM from hf_config.

    NeoBERT's attention is flash-attn's varlen kernel when training runs on CUDA in bf16 with
    flash_attn installed, else its default SDPA path (:func:`neobert.device.attention_implementation`).
    """
    if model_args.hf_config:
        from transformers import AutoConfig, AutoModelForMaskedLM

        if not Path(model_args.hf_config).exists():
            raise UserError(f"model.hf_config: file not found: {model_args.hf_config}")
        hf = AutoConfig.from_pretrained(model_args.hf_config)
        if hf.vocab_size < len(tokenizer):
            raise UserError(f"{model_args.hf_config}: vocab_size {hf.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
        return AutoModelForMaskedLM.from_config(hf)
    fields = {k: v for k, v in vars(model_args).items() if k not in ("init_from", "init_optimizer", "hf_config")}
    # training decodes only the masked positions (the sparse head); final/ is saved with full logits
    config = NeoBERTConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, sparse_prediction=True, **fields)
    if device is not None:
        config._attn_implementation = attention_implementation(device, bf16)
    model = NeoBERTForMaskedLM(config)
    if model_args.init_from:
        load_initial_weights(model, model_args.init_from)
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
        weights = load_file(str(file))
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # another shape: a smaller vocabulary, another width
        detail = next((line.strip() for line in str(e).splitlines()[1:] if "size mismatch" in line), str(e).splitlines()[0])
        raise UserError(f"model.init_from={source}: its weights do not fit this model ({detail}; the tokenizer has {model.config.vocab_size} tokens)") from None
    except SafetensorError as e:
        raise UserError(f"model.init_from={source}: cannot read {file} ({str(e).splitlines()[0]})") from None
    # a tied decoder is saved once, under the embedding's name: it is loaded through that name
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in weights if k in own}
    missing = [k for k in missing if own[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise UserError(f"model.init_from={source}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_initial_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, source: str, args: TrainArgs) -> None:
    """Continue the AdamW state of ``source`` (a checkpoint, or a run directory's newest one).

    Its moments carry over; the hyper-parameters stay this run's, not the checkpoint's.
    """
    if not source:
        raise UserError("model.init_optimizer=true needs model.init_from")
    path = Path(source)
    checkpoint = path if common.has_optimizer_state(path) else common.latest_checkpoint(path)
    if checkpoint is None:
        raise UserError(f"model.init_optimizer: {source} holds no checkpoint with optimizer state (optimizer.pt)")
    common.load_checkpoint(checkpoint, model, optimizer)  # its weights are init_from's final ones
    decay, no_decay = optimizer.param_groups
    decay["weight_decay"], no_decay["weight_decay"] = args.weight_decay, 0.0
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = tuple(args.betas), args.eps


def check_vocab(model: torch.nn.Module, tokenizer) -> None:
    vocab = model.config.vocab_size
    if vocab < len(tokenizer) or tokenizer.mask_token_id is None:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens (mask id {tokenizer.mask_token_id}) but the model's vocab_size is {vocab}")


def wrap_model(model: torch.nn.Module, args: TrainArgs, dist: common.Dist) -> torch.nn.Module:
    """The model on this process's device, wrapped for the processes: DDP, or FSDP2 with
    ``train.fsdp`` (``fully_shard`` per encoder block, then the rest).

    Under FSDP2 with bf16 the blocks compute in bf16 (parameters all-gathered as bf16, the
    fp32 shards stay the master weights, gradients land on them in fp32) and gradients are
    reduced in fp32: a ``MixedPrecisionPolicy``. The step's autocast context stays on top
    and casts nothing twice: the parameters are already bf16, and the ops autocast keeps in
    fp32 (softmax, norms) still are, as under DDP. The logits are bf16 and the loss fp32
    (the model's cross-entropy upcasts) with or without it (tests/test_distributed.py).
    """
    model.to(dist.device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if dist.world > 1:
        if args.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16(args.bf16, dist.device) else MixedPrecisionPolicy()
            for block in model.base_model.transformer_encoder if hasattr(model.base_model, "transformer_encoder") else []:
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # find_unused_parameters keeps DDP's gradient buckets in their construction order: by
            # default DDP re-buckets after its first step, so a resumed run (whose first step is
            # step N) would sum the gradients of 3+ processes in another order than the run it
            # continues (measured: 4 processes, resumed at step 5, weights 1e-5 apart at step 10)
            model = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None, find_unused_parameters=True)
    if args.compile:
        model = torch.compile(model)
    return model


# ---------------------------------------------------------------------------------------
# One step, evaluation


def mlm_step(model, micro: list[dict], cfg: PretrainConfig, dist: common.Dist) -> tuple[float, int]:
    """Forward and backward of the micro-batches of one optimizer step (``MicroBatches`` items:
    model inputs, masked and real token counts) on this process.

    Returns the step's mean loss per masked token and its real tokens, over all processes.
    The loss is reduced as one sum over the masked tokens of every micro-batch and process,
    divided by their global count: each micro-batch adds the model's own mean cross-entropy
    times its masked tokens, and a micro-batch with none adds a zero (its mean would be 0/0);
    a step with none at all reports 0.
    """
    args = cfg.train
    # every masked token of the global batch weighs the same, however it is split
    n_masked = dist.all_sum(float(sum(b["masked"] for b in micro)))
    step_loss, step_tokens = 0.0, 0
    for m, batch in enumerate(micro):
        inputs, n = to_device(batch["inputs"], dist.device, dynamic=args.compile), batch["masked"]
        if args.compile and "max_length_q" in inputs:
            # the varlen kernels take any upper bound of the longest segment; a constant one is
            # not a guard of the compiled graph (an int input is specialized on its value)
            inputs["max_length_q"] = cfg.data.max_length
        with no_sync(model, m < len(micro) - 1), autocast(dist.device, args.bf16):
            out = model(**inputs)
            # a zero that stays in the graph, so every process and micro-batch still runs backward
            loss_sum = out.loss * n if n else out.logits.sum() * 0.0
            (loss_sum * dist.world / max(n_masked, 1)).backward()  # DDP averages over ranks: undo with world
        step_loss += loss_sum.item()
        step_tokens += batch["tokens"]
    return dist.all_sum(step_loss) / max(n_masked, 1), int(dist.all_sum(step_tokens))


# the sizes of a flattened batch that change from batch to batch: the token count, the segments, the labels
DYNAMIC_DIMS = {"input_ids": 1, "position_ids": 1, "labels": 1, "cu_seq_lens_q": 0, "label_positions": 0}


def to_device(inputs: dict, device: torch.device, dynamic: bool = False) -> dict:
    """The model inputs on ``device``; ``dynamic`` (torch.compile) marks the sizes that vary
    between batches as dynamic, so that a new size is not a new graph."""
    inputs = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if dynamic:
        for key, dim in DYNAMIC_DIMS.items():
            if key in inputs:
                torch._dynamo.maybe_mark_dynamic(inputs[key], dim)
    return inputs


@contextmanager
def no_sync(model: torch.nn.Module, skip: bool):
    """Gradients of all but the last micro-batch of a step stay local (``skip``): DDP's
    ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)`` (unsharded gradients
    accumulate on each process; the last micro-batch reduce-scatters their sum once).
    A no-op for one process."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(model, "_orig_mod", model)
    if not skip:
        yield
    elif isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    elif hasattr(inner, "no_sync"):
        with inner.no_sync():
            yield
    else:
        yield


def heldout_batches(rows: Rows, masker: MLMMasker, cfg: PretrainConfig, rank: int = 0, world: int = 1):
    """The fixed held-out evaluation batches (same rows and masks every time), this rank's share.

    Each held-out row is scored at most once: a split smaller than ``eval_batches`` full
    micro-batches ends with a shorter batch (row indices past ``len(rows)`` would be the
    next epoch's copies of the same rows). Every process gets as many batches as the
    first: a forward pass is collective under FSDP and DDP, so a process short of one
    runs the first batch again with no label, which scores nothing.
    """
    mb = cfg.train.micro_batch_size
    n_batches = min(cfg.train.eval_batches, math.ceil(len(rows) / mb))
    for i in range(rank, math.ceil(n_batches / world) * world, world):
        j = i if i < n_batches else 0
        idx = range(j * mb, min((j + 1) * mb, len(rows)))
        batch = masker(collate(rows.rows(idx), cfg.data.packing, cfg.data.max_length), seed=12345, step=j)
        if i >= n_batches:
            batch["labels"] = torch.full_like(batch["labels"], -100)
        yield batch


@torch.no_grad()
def evaluate(model, heldout_rows: Rows, masker: MLMMasker, cfg: PretrainConfig, dist: common.Dist, is_neobert: bool) -> dict:
    """Held-out MLM loss and masked-token accuracy on a fixed set of batches (same masks every time)."""
    model.eval()
    loss_sum = correct = count = 0.0
    for batch in heldout_batches(heldout_rows, masker, cfg, dist.rank, dist.world):
        inputs = to_device(model_inputs(batch, is_neobert), dist.device)
        labels = inputs["labels"]
        with autocast(dist.device, cfg.train.bf16):
            logits = model(**inputs).logits.float()  # NeoBERT decodes only the masked positions
        if logits.dim() == 3:
            logits = logits[labels != -100]
        target = labels[labels != -100]
        loss_sum += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    loss_sum, correct, count = dist.all_sum(loss_sum), dist.all_sum(correct), dist.all_sum(count)
    model.train()
    return {"eval_loss": loss_sum / max(count, 1), "eval_accuracy": correct / max(count, 1), "eval_tokens": int(count)}
