"""text-generation-webui's training parameters read as this project's.

The webui (its Training tab since the March 2026 rewrite; older files too) writes `training_parameters.json`
into `user_data/loras/NAME/` with its own keys (FORMATS.md lists them). `TrainingParameters.from_dict` reads
every file through `read_webui_parameters`, which maps those keys onto ours and leaves a file of ours as it is:

- `all_linear` true: target modules "all-linear"; otherwise the ticked `q_proj_en` ... `up_proj_en` flags: the
  matching choice (q-v, q-k-v-o) or a custom list;
- `dataset` and `text_dataset` (names without their `.json` ending): `dataset`, with the ending of the file
  found in the datasets folders; a text dataset becomes text rows, chunked with our raw-text rules;
- `stride_length`: `overlap_len` (see `_text_chunking`); `excess_length`: `overlong_samples`;
- `format` of the current webui: an instruction template (`chat_template`), or "Chat Template" for the model's
  own; an older webui's `format` is a format file, as ours;
- `save_steps`, `warmup_steps`, `eval_steps` count micro-batches there, optimiser steps here (`_optimizer_steps`);
- AdamW under another kernel (`adamw_torch_fused`, `adamw_hf`, ...): `adamw_torch`;
- `always_override`, `report_to`, `higher_rank_limit`: nothing here (dropped).

Keys of ours present in the file win over the webui's. The result holds none of the webui's own keys, so reading
it again changes nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import DashboardError
from .home import DATASET_ENDINGS, check_name, datasets_dirs

PROJECTION_FLAG = "_proj_en"  # q_proj_en, k_proj_en, ...: one checkbox per projection
# Keys only the webui writes (old and current versions); any of them, or a projection flag, marks its file.
WEBUI_ONLY_KEYS = ("always_override", "all_linear", "text_dataset", "stride_length", "excess_length", "report_to",
                   "higher_rank_limit")
# Keys of the current webui only: its `format` names an instruction template, no longer a format file.
CURRENT_WEBUI_KEYS = ("all_linear", "text_dataset", "stride_length", "excess_length")
WEBUI_MODEL_TEMPLATE = "Chat Template"  # its `format` for the model's own chat template
WEBUI_NOTHING = ("", "None", "none")  # what it stores for a dataset or template left unchosen
ROWS_FIELDS = ("dataset", "eval_dataset")
# The webui divides these by the gradient accumulation before the HF Trainer sees them: they count micro-batches.
MICRO_BATCH_STEP_FIELDS = ("save_steps", "warmup_steps", "eval_steps")
# The webui's optimisers that run the AdamW update with another kernel.
ADAMW_VARIANTS = ("adamw_hf", "adamw_torch_fused", "adamw_torch_xla", "adamw_apex_fused", "adamw_anyprecision")


def is_webui_parameters(data: dict[str, Any]) -> bool:
    """Whether a parameters dict is the webui's: it holds a key only the webui writes."""
    return any(isinstance(key, str) and (key in WEBUI_ONLY_KEYS or key.endswith(PROJECTION_FLAG)) for key in data)


def read_webui_parameters(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of `data` with the webui's keys mapped onto ours (see the module docstring) and removed; a dict of
    ours is returned unchanged. Values are not checked here: `from_dict` coerces them and names a bad one."""
    if not is_webui_parameters(data):
        return dict(data)
    current = any(key in data for key in CURRENT_WEBUI_KEYS)
    mapped = dict(data)
    _target_modules(data, mapped)
    _datasets(data, mapped)
    _text_chunking(data, mapped)
    if current:
        _instruction_template(data, mapped)
    _optimizer_steps(data, mapped)
    if "excess_length" in data and "overlong_samples" not in data:
        mapped["overlong_samples"] = data["excess_length"]
    if data.get("optimizer") in ADAMW_VARIANTS:
        mapped["optimizer"] = "adamw_torch"
    return {key: value for key, value in mapped.items()
            if not (isinstance(key, str) and (key in WEBUI_ONLY_KEYS or key.endswith(PROJECTION_FLAG)))}


def _is_on(value: Any) -> bool:
    """A webui checkbox as stored: true, or "true"/"True" in a file edited by hand."""
    return value is True or value in ("true", "True", 1)


def _target_modules(data: dict[str, Any], mapped: dict[str, Any]) -> None:
    """all_linear, else the ticked projection flags, as our target modules choice (custom when none fits)."""
    from .params import TARGET_MODULE_CHOICES  # params imports this module

    if "target_modules" in data:
        return
    if _is_on(data.get("all_linear")):  # the webui ignores the flags then
        mapped["target_modules"] = "all-linear"
        return
    flags = {key[: -len("_en")]: on for key, on in data.items()
             if isinstance(key, str) and key.endswith(PROJECTION_FLAG)}
    if not flags:
        return
    chosen = [name for name, on in flags.items() if _is_on(on)]
    for choice, modules in TARGET_MODULE_CHOICES.items():
        if isinstance(modules, list) and sorted(modules) == sorted(chosen):
            mapped["target_modules"] = choice
            return
    # No flag ticked: an empty custom list, which validation refuses with a sentence saying what to list.
    mapped["target_modules"] = "custom"
    mapped["custom_target_modules"] = ",".join(chosen)


def _datasets(data: dict[str, Any], mapped: dict[str, Any]) -> None:
    """The webui's dataset names (without `.json`) as the names our lists show; a text dataset is our dataset
    (text rows) unless a chat dataset is chosen too (the webui refuses both, before writing the file)."""
    for name in ROWS_FIELDS:
        if name in data:
            mapped[name] = _listed_name(data[name])
    if _uses_text_dataset(data):
        mapped["dataset"] = _listed_name(data["text_dataset"])


def _uses_text_dataset(data: dict[str, Any]) -> bool:
    text = data.get("text_dataset")
    return isinstance(text, str) and text not in WEBUI_NOTHING and data.get("dataset") in (None, *WEBUI_NOTHING)


def _listed_name(value: Any) -> Any:
    """`name` as the datasets lists name it: `name.json` (the only ending the webui reads) when that file is in
    datasets/ or training/datasets/; anything else unchanged (a bare name still resolves when it is read)."""
    if not isinstance(value, str) or value in WEBUI_NOTHING or Path(value).suffix.lower() in DATASET_ENDINGS:
        return value
    try:
        check_name(value, "dataset")
    except DashboardError:
        return value
    for folder in datasets_dirs():
        if (folder / f"{value}.json").is_file():
            return f"{value}.json"
    return value


def _text_chunking(data: dict[str, Any], mapped: dict[str, Any]) -> None:
    """The webui's stride is our overlap: it cuts a text dataset into windows of cutoff tokens that start every
    cutoff - stride tokens, so consecutive chunks share `stride_length` tokens, which is what `overlap_len`
    means here. (The Perplexity tab's own "stride" is a different setting, never stored in this file.) Its
    cuts fall at exact token counts, at no newline and no hard cut string: a text-dataset run keeps that here
    with no newline favour and no hard cut string, where the file does not say otherwise."""
    if "stride_length" in data and "overlap_len" not in data:
        mapped["overlap_len"] = data["stride_length"]
    if _uses_text_dataset(data):
        mapped.setdefault("newline_favor_len", 0)
        mapped.setdefault("hard_cut_string", "")


def _instruction_template(data: dict[str, Any], mapped: dict[str, Any]) -> None:
    """The current webui's `format` names an instruction template (a file in instruction-templates/), or the
    model's own template; it is our `chat_template`, and no format file is used."""
    value = data.get("format")
    if not isinstance(value, str):
        return
    mapped["format"] = ""
    if "chat_template" not in data and value not in WEBUI_NOTHING:
        mapped["chat_template"] = "" if value == WEBUI_MODEL_TEMPLATE else value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _optimizer_steps(data: dict[str, Any], mapped: dict[str, Any]) -> None:
    """Save, warm-up and eval steps in optimiser steps: the webui gives the HF Trainer ceil(n / accumulation),
    with accumulation = batch size // micro batch size. Values that are not whole numbers are left for the
    coercion to refuse."""
    batch, micro = _number(data.get("batch_size")), _number(data.get("micro_batch_size"))
    if not batch or not micro or batch <= 0 or micro <= 0:
        return
    accumulation = max(1, int(batch // micro))
    for name in MICRO_BATCH_STEP_FIELDS:
        steps = _number(data.get(name))
        if accumulation > 1 and steps is not None and steps >= 0 and steps.is_integer():
            mapped[name] = math.ceil(steps / accumulation)
