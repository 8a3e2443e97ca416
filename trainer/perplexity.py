"""Perplexity by the sliding-window method (each token scored once, with up to max_length of context)."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import DashboardError


def sliding_window_nll(model, input_ids: list[int], stride: int, max_length: int, device="cpu",
                       progress=None) -> tuple[float, int]:
    """Summed negative log-likelihood and the number of scored tokens (all but the first)."""
    import torch
    import torch.nn.functional as F

    if not 0 < stride <= max_length:
        raise DashboardError(f"Stride ({stride}) must be between 1 and the max length ({max_length}).",
                             field="stride")
    n = len(input_ids)
    if n < 2:
        raise DashboardError("The text is too short: perplexity needs at least two tokens.")
    ids = torch.tensor(input_ids, dtype=torch.long, device=device)
    total, scored, previous_end = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + max_length, n)
            new = end - previous_end  # tokens this window scores; the rest is context already scored
            window = ids[begin:end].unsqueeze(0)
            logits = model(input_ids=window).logits[0, :-1].float()
            targets = window[0, 1:].clone()
            targets[: max(0, targets.numel() - new)] = -100
            total += float(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            scored += int((targets != -100).sum())
            previous_end = end
            if progress:
                progress(end / n)
            if end == n:
                break
    return total, scored


def perplexity_of_file(model_name: str, lora: str | None, text_file: str, stride: int, max_length: int,
                       precision: str = "full", progress=None) -> dict:
    from .data import read_text_file
    from .home import resolve_user_path
    from .models import attach_adapter, load_model, load_tokenizer

    if stride <= 0 or max_length <= 0:
        raise DashboardError("Stride and max length must be positive.")
    path = resolve_user_path(text_file, "dataset")
    text = read_text_file(path)
    tokenizer = load_tokenizer(model_name)
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = load_model(model_name, precision)
    if lora:
        model = attach_adapter(model, resolve_user_path(lora, "lora"))
    nll, scored = sliding_window_nll(model, input_ids, stride, max_length, next(model.parameters()).device,
                                     progress)
    return {"model": model_name, "lora": lora or "", "text_file": str(text_file), "stride": stride,
            "max_length": max_length, "tokens": scored, "nll": nll / scored,
            "perplexity": math.exp(nll / scored)}
