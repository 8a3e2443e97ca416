"""The training loss: summed next-token cross-entropy over the trained tokens of a micro-batch.

A causal LM's logits are a (rows x positions x vocabulary) tensor: for SmolLM2 and a 4 x 256 batch that is
200 MB of float32, written, copied, soft-maxed and zero-filled again in the backward pass, a tenth of a CPU
step spent on memory traffic alone. For model families whose logits are exactly `lm_head(last hidden
state)`, the loss here instead
- takes the final hidden states and keeps only the positions whose next token is trained (a prompt under
  "train only after", padding and the last position of each row cost nothing), and
- runs the output layer and the cross-entropy over those positions a chunk at a time, computing each
  chunk's gradient with respect to the hidden states in the same pass, so no full logits tensor ever
  exists (the idea of Liger-Kernel's fused linear cross-entropy, which needs a GPU and Triton).
Other families (soft-capped or scaled logits) and FSDP-sharded models take the plain path through the
model's own logits. Both give the same loss (tests/test_loss.py).
"""

from __future__ import annotations

from .data import IGNORE_INDEX

# Model types whose causal-LM head is a plain `lm_head(hidden_states)`, with no soft-capping or scaling, and
# whose last hidden state is the normed one the head reads (GPT-2's tied head and GPT-NeoX's embed_out too:
# tests/test_architectures.py checks each against the model's own logits). Gemma's logits are soft-capped.
PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "gpt2", "gpt_neox"}

# Positions per chunk of the output layer: 256 x 49,152 float32 logits are 50 MB, instead of the 200 MB of a
# whole 4 x 256 batch, and the matrix products stay large enough to run at full speed.
CHUNK_POSITIONS = 256


def plain_output_head(model):
    """The frozen output layer of `model` when the chunked loss applies to it, else None."""
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    try:
        from torch.distributed.fsdp import FSDPModule
        if isinstance(inner, FSDPModule):  # its parameters are only whole inside its own forward
            return None
    except ImportError:  # pragma: no cover - torch builds without distributed support
        pass
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or not hasattr(base, "get_output_embeddings"):
        return None
    head = base.get_output_embeddings()
    if head is None or not hasattr(head, "weight") or head.weight.requires_grad or getattr(head, "bias", None) is not None:
        return None
    return head


def _chunked_cross_entropy_function():
    import torch

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        """sum(cross_entropy(hidden @ weight.T, targets)), a chunk of positions at a time; the weight is frozen."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            needs_grad = ctx.needs_input_grad[0]
            # Half-precision logits are soft-maxed in float32, as transformers does; float64 stays float64.
            loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
            total = torch.zeros((), dtype=loss_dtype, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if needs_grad else None
            for start in range(0, hidden.shape[0], chunk):
                part = slice(start, start + chunk)
                logits = (hidden[part] @ weight.t()).to(loss_dtype)
                chunk_targets = targets[part]
                log_norm = torch.logsumexp(logits, dim=-1)
                total += (log_norm - logits.gather(1, chunk_targets[:, None]).squeeze(1)).sum()
                if needs_grad:
                    # d loss / d logits = softmax - one_hot(target), built in place in the logits' memory.
                    probs = logits.sub_(log_norm[:, None]).exp_()
                    probs[torch.arange(len(chunk_targets), device=probs.device), chunk_targets] -= 1.0
                    grad_hidden[part] = probs.to(weight.dtype) @ weight
            ctx.save_for_backward(grad_hidden)
            return total

        @staticmethod
        def backward(ctx, grad_output):
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None

    return ChunkedLinearCrossEntropy


_CHUNKED = None


def chunked_linear_cross_entropy(hidden, weight, targets, chunk: int = CHUNK_POSITIONS):
    """Summed cross-entropy of `hidden @ weight.T` (n x vocab, never held whole) against `targets` (n)."""
    global _CHUNKED
    if _CHUNKED is None:
        _CHUNKED = _chunked_cross_entropy_function()
    return _CHUNKED.apply(hidden, weight, targets, chunk)


def causal_lm_loss_sum(model, batch, head="auto"):
    """Summed next-token loss over the trained tokens of a micro-batch (padding and masked tokens excluded).

    `head` is the model's output layer for the chunked path (found with `plain_output_head` when "auto"),
    or None for the plain path through the model's logits.
    """
    import torch
    import torch.nn.functional as F

    if head == "auto":
        head = plain_output_head(model)
    targets = batch["labels"][:, 1:]
    # No attention mask: position ids restarting per sample make transformers attend within each sample
    # (and use_cache=False, or it would not look at them).
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    if head is not None:
        # An empty logits_to_keep makes the model skip its own output layer; the final (normed) hidden
        # states come back as the last of hidden_states. Going through the model's forward keeps
        # DistributedDataParallel's gradient hooks in place.
        output = model(**inputs, output_hidden_states=True,
                       logits_to_keep=torch.zeros(0, dtype=torch.long, device=targets.device))
        trained = targets != IGNORE_INDEX
        hidden = output.hidden_states[-1][:, :-1][trained]
        return chunked_linear_cross_entropy(hidden, head.weight, targets[trained])
    logits = model(**inputs).logits
    # Shift the labels rather than the logits: slicing the logits would copy the whole (rows x width x vocab) tensor.
    labels = F.pad(targets, (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


MEMORISING_LOSS = 1.0  # under this the model may be memorising the text (the Evaluate page's forgetting check)


def loss_warning(loss: float) -> tuple[str, str] | None:
    """What a training loss tells beyond its value, as (level, sentence): "error" for exactly 0 (something is
    broken; the trainer ends such a run as failed), "warning" under MEMORISING_LOSS; None otherwise."""
    if loss == 0.0:
        return "error", "A loss of exactly 0 means something is broken (all labels masked, bad data), not a perfect model."
    if loss < MEMORISING_LOSS:
        return "warning", ("The loss is under 1.0: the model may be memorising your text and forgetting what it knew. "
                           "Check a checkpoint on the Evaluate page (forgetting check) before training further.")
    return None
