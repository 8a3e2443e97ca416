"""Perplexity by the sliding-window method (each token scored once, with up to max_length of context)."""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

from .errors import DashboardError


def sliding_window_nll(model, input_ids: list[int], stride: int, max_length: int, device="cpu",
                       progress=None) -> tuple[float, int]:
    """Summed negative log-likelihood and the number of scored tokens (all but the first).

    Windows of up to `max_length` tokens start at 0 and move by `stride`; each window scores only the
    tokens no earlier window scored, with the window's earlier tokens as their context. A window always
    keeps at least one token of context (with stride == max_length it moves by max_length - 1), so every
    token after the first is scored exactly once.
    """
    import torch
    import torch.nn.functional as F

    if max_length < 2:
        raise DashboardError(f"Max length ({max_length}) must be at least 2 tokens.", field="max_length")
    if not 0 < stride <= max_length:
        raise DashboardError(f"Stride ({stride}) must be between 1 and the max length ({max_length}).",
                             field="stride")
    n = len(input_ids)
    if n < 2:
        raise DashboardError("The text is too short: perplexity needs at least two tokens.")
    ids = torch.tensor(input_ids, dtype=torch.long, device=device)
    total, scored = 0.0, 0
    begin, previous_end = 0, 1  # tokens before previous_end are scored already (token 0 never is)
    model.eval()
    with torch.no_grad():
        while True:
            end = min(begin + max_length, n)
            window = ids[begin:end].unsqueeze(0)
            logits = model(input_ids=window).logits[0, :-1].float()
            targets = window[0, 1:].clone()  # targets[i] is token begin + 1 + i
            targets[: previous_end - (begin + 1)] = -100
            total += float(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            scored += int((targets != -100).sum())
            previous_end = end
            if progress:
                progress(end / n)
            if end == n:
                break
            begin = min(begin + stride, end - 1)
    return total, scored


def _stderr(message: str) -> None:
    # Model conversion messages must not mix into `--json` output on stdout.
    print(message, file=sys.stderr, flush=True)


def resolve_lora(lora: str) -> Path:
    """An adapter folder: absolute, relative to the home folder, or a bare run name under loras/."""
    from .home import loras_dir, resolve_user_path

    path = resolve_user_path(lora, "lora")
    if not path.exists() and not Path(lora).is_absolute() and (loras_dir() / lora).exists():
        path = loras_dir() / lora
    return path


class ModelCache:
    """Base models kept for several evaluations in one process (a job evaluating each checkpoint).

    An adapter is attached to a copy of the cached base, so the base stays clean and every result equals
    the one a fresh `python -m trainer perplexity` computes."""

    def __init__(self):
        self.models: dict[tuple[str, str], object] = {}

    def get(self, model_name: str, lora: Path | None, precision: str):
        import copy

        from .models import attach_adapter, load_model

        if precision != "full":  # quantised models are not copied; load them afresh
            model = load_model(model_name, precision, progress=_stderr)
            return attach_adapter(model, lora) if lora else model
        key = (model_name, precision)
        if key not in self.models:
            self.models.clear()
            self.models[key] = load_model(model_name, precision, progress=_stderr)
        base = self.models[key]
        return attach_adapter(copy.deepcopy(base), lora) if lora else base


def perplexity_of_file(model_name: str, lora: str | None, text_file: str, stride: int, max_length: int,
                       precision: str = "full", progress=None, cache: ModelCache | None = None) -> dict:
    """Sliding-window perplexity of a model (with an adapter when `lora` is given) on a UTF-8 text file."""
    from .data import read_text_file
    from .home import resolve_user_path
    from .models import load_tokenizer

    if stride <= 0 or max_length <= 0:
        raise DashboardError("Stride and max length must be positive.")
    path = resolve_user_path(text_file, "dataset")
    text = read_text_file(path)
    tokenizer = load_tokenizer(model_name, progress=_stderr)
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lora_path = resolve_lora(lora) if lora else None
    model = (cache or ModelCache()).get(model_name, lora_path, precision)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max_length > limit:
        raise DashboardError(f"Max length {max_length} is more than the model's {limit} positions.",
                             field="max_length")
    nll, scored = sliding_window_nll(model, input_ids, stride, max_length, next(model.parameters()).device,
                                     progress)
    return {"model": model_name, "lora": lora or "", "text_file": str(text_file), "stride": stride,
            "max_length": max_length, "tokens": scored, "nll": nll / scored,
            "perplexity": math.exp(nll / scored),
            "text_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
