"""Model loading for the command line: refuse weights that do not fit, in one line.

``from_pretrained`` fills a tensor missing from the weights file with random values,
drops tensors it has no place for, and fails on a truncated or wrong-shape file with a
traceback; as an API that is transformers' behaviour and stays so. A command, though,
that embeds or evaluates with a model that silently got random weights gives wrong
numbers. :func:`strict_weights` wraps any loading code (``from_pretrained``, a
``SentenceTransformer``) and turns those cases into a ``UserError`` naming the tensors:

- a tensor of the encoder (the base model) missing from the file, or a file tensor that
  belongs to the encoder but has no place in it, or one of another shape;
- a weights file that cannot be read (truncated, not safetensors).

A task head that the caller creates (a new classifier, say) may be missing, and a head
of another task in the file (an MLM decoder read into an encoder) may be left unused:
that is ordinary transfer. :func:`check_vocab` refuses a tokenizer that produces ids the
model cannot embed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from neobert.errors import UserError


def _base_names(model) -> set[str]:
    """The first key components that belong to the encoder: its prefix in a task model
    and the names of its own submodules."""
    base = getattr(model, "base_model", model)
    names = {name for name, _ in base.named_children()}
    names |= {name.split(".")[0] for name, _ in base.named_parameters()}
    prefix = getattr(model, "base_model_prefix", "")
    if prefix:  # a task model's encoder, or a file's prefixed key read into a bare encoder
        names.add(prefix)
    return names


def _listing(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def check_loading_info(model, info, source: str) -> None:
    """Raise a one-line UserError when ``info`` (transformers' ``LoadStateDictInfo``) shows
    encoder weights missing, unplaced or of another shape; see the module docstring."""
    base = _base_names(model)

    def in_base(key: str) -> bool:
        return key.split(".")[0] in base

    if info.error_msgs:
        first = next((line.strip() for msg in info.error_msgs for line in str(msg).splitlines() if line.strip()), "")
        raise UserError(f"{source}: the weights do not fit the model ({first})")
    mismatched = [k for k, *_ in info.mismatched_keys if in_base(k)]
    if mismatched:
        shapes = {k: (a, b) for k, a, b in info.mismatched_keys}
        k = sorted(mismatched)[0]
        raise UserError(f"{source}: {len(mismatched)} tensor(s) have another shape than the model's config says, e.g. {k} {tuple(shapes[k][0])} in the file vs {tuple(shapes[k][1])}")
    missing = [k for k in info.missing_keys if in_base(k)]
    if missing:
        raise UserError(f"{source}: {len(missing)} tensor(s) of the model are missing from its weights file ({_listing(missing)}); they would be random")
    unexpected = [k for k in info.unexpected_keys if in_base(k)]
    if unexpected:
        raise UserError(f"{source}: {len(unexpected)} tensor(s) in its weights file have no place in the model ({_listing(unexpected)}); is config.json the one these weights were saved with?")


@contextlib.contextmanager
def strict_weights(source: str) -> Iterator[None]:
    """Within the block, every ``from_pretrained`` is checked by :func:`check_loading_info`,
    and an unreadable weights file becomes a one-line UserError naming ``source``."""
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    original = mu.log_state_dict_report

    def report(*args, **kwargs):
        model, info = kwargs.get("model", args[0] if args else None), kwargs.get("loading_info")
        if info is not None and model is not None:
            check_loading_info(model, info, source)
        return original(*args, **kwargs)

    mu.log_state_dict_report = report
    try:
        yield
    except SafetensorError as e:
        raise UserError(f"{source}: cannot read model.safetensors ({str(e).splitlines()[0]})") from None
    except RuntimeError as e:
        text = str(e)
        if "size mismatch" in text or "Error(s) in loading state_dict" in text or "shape" in text.lower():
            detail = next((line.strip() for line in text.splitlines()[1:] if line.strip()), text.splitlines()[0])
            raise UserError(f"{source}: the weights do not fit the model ({detail})") from None
        raise
    finally:
        mu.log_state_dict_report = original


def check_vocab(tokenizer, embeddings_rows: int, source: str) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding table."""
    if tokenizer is not None and len(tokenizer) > embeddings_rows:
        raise UserError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {embeddings_rows}; use the tokenizer the model was trained with")
