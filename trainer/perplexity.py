"""Perplexity by the sliding-window method (each token scored once, with up to max_length of context), and the
settings of an evaluation, shared by the command line and the Evaluate page."""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .adapters import BaseWithAdapters
from .data import IGNORE_INDEX
from .datafiles import read_text_file
from .errors import DashboardError
from .home import loras_dir, resolve_user_path
from .models import load_tokenizer
from .params import PRECISIONS

# The longest window the Evaluate page offers (a model's own limit is checked when it is loaded).
LONGEST_WINDOW = 32768


@dataclass(frozen=True)
class EvaluationSettings:
    """How a perplexity is measured: the sliding window (stride, max length) and the base model's precision;
    and the general text the forgetting check measures on. Numbers are comparable only with equal settings."""

    stride: int = 256
    max_length: int = 512
    precision: str = "full"
    general_text: str = "general-text.txt"

    def validate(self) -> EvaluationSettings:
        """The settings, or a DashboardError naming the field and what it must be."""
        if self.max_length < 2:
            raise DashboardError(f"Max length ({self.max_length}) must be at least 2 tokens.", field="max_length")
        if not 0 < self.stride <= self.max_length:
            raise DashboardError(f"Stride ({self.stride}) must be between 1 and the max length ({self.max_length}).",
                                 field="stride")
        if self.precision not in PRECISIONS:
            raise DashboardError(f"Precision ({self.precision}) must be one of {', '.join(PRECISIONS)}.",
                                 field="precision")
        return self


DEFAULT_SETTINGS = EvaluationSettings()


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

    EvaluationSettings(stride, max_length).validate()
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
            targets[: previous_end - (begin + 1)] = IGNORE_INDEX
            total += float(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
            scored += int((targets != IGNORE_INDEX).sum())
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
    path = resolve_user_path(lora, "lora")
    if not path.exists() and not Path(lora).is_absolute() and (loras_dir() / lora).exists():
        path = loras_dir() / lora
    return path


class ModelCache:
    """The base model of the last evaluation, with the adapters evaluated so far, kept for the next one (a job
    evaluating each checkpoint loads the base model once). Every result equals the one a fresh
    `python -m trainer perplexity` computes."""

    def __init__(self):
        self.models: BaseWithAdapters | None = None

    def using(self, model_name: str, lora: Path | None, precision: str):
        """A context manager giving the model computing with `lora` (None: the base model alone)."""
        if self.models is None or (self.models.model_name, self.models.precision) != (model_name, precision):
            self.models = None  # let the previous model go before the next one loads
            self.models = BaseWithAdapters(model_name, precision, progress=_stderr)
        return self.models.using(lora)


def perplexity_of_file(model_name: str, lora: str | None, text_file: str, stride: int, max_length: int,
                       precision: str = "full", progress=None, cache: ModelCache | None = None) -> dict:
    """Sliding-window perplexity of a model (with an adapter when `lora` is given) on a UTF-8 text file."""
    EvaluationSettings(stride, max_length, precision).validate()
    path = resolve_user_path(text_file, "dataset")
    text = read_text_file(path)
    tokenizer = load_tokenizer(model_name, progress=_stderr)
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lora_path = resolve_lora(lora) if lora else None
    with (cache or ModelCache()).using(model_name, lora_path, precision) as model:
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
