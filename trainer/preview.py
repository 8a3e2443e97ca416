"""What the Data and Train pages show about the samples, as plain values the pages only draw.

The Data page: which options each kind of data has, the options it hands to the Train page, the preview's
numbers, its problem table, a page of sample cards and how each card's tokens are highlighted. The Train
page: the plan (samples, packed rows, steps). Both read their samples through the sample cache
(trainer/samplecache.py), the same entries the trainer reads.
"""

from __future__ import annotations

import math
from typing import Any

from .data import Preview, Sample
from .errors import DashboardError
from .params import FIELDS, SAMPLE_OPTIONS

KINDS = ("raw", "formatted")
DATASET_FIELD = {"raw": "raw_text_file", "formatted": "dataset"}  # where each kind names its data
PAGE_SIZES = [5, 10, 25]


# ---- the Data page's options -----------------------------------------------------------------------
def option_rows(kind: str, shapes: frozenset[str] | None = None) -> list[list[str]]:
    """The options of this kind of data in form order (the dataset picker itself is drawn apart): a row of
    values, then a row of switches. `shapes`: what a formatted dataset's rows were recognised as
    (`dataset_shapes`); text rows are chunked with the raw-text rules, so they get those options, in a row of
    their own between the two."""
    names = [name for name in SAMPLE_OPTIONS if _offered(name, kind, shapes)]
    switches = [name for name in names if FIELDS[name].type == "bool"]
    values = [name for name in names if name not in switches]
    rules = [name for name in values if FIELDS[name].metadata["data_kind"] == "raw"] if kind == "formatted" else []
    return [[name for name in values if name not in rules]] + ([rules] if rules else []) + [switches]


def _offered(name: str, kind: str, shapes: frozenset[str] | None) -> bool:
    """Whether the Data page offers option `name` for this kind of data and these row shapes: an option that
    would change nothing is not offered (unknown shapes: every option of the kind)."""
    data_kind = FIELDS[name].metadata["data_kind"]
    if name in DATASET_FIELD.values():
        return False
    if kind == "raw" or not shapes:
        return data_kind in (None, kind)
    if data_kind == "raw":
        return "text" in shapes  # text rows are chunked with the raw-text rules
    if data_kind is None or name == "format":  # the format file decides which rows are records
        return True
    if name == "train_only_after":
        return "other" in shapes  # it masks records rendered through a format file only
    return shapes != {"text"}  # the options of rendered rows


def dataset_shapes(kind: str, dataset: str | None) -> frozenset[str] | None:
    """What a formatted dataset's rows are, read cheaply before the options are drawn (trainer/shapes.py);
    None for raw text, no dataset or one that is not found."""
    from .datafiles import find_dataset
    from .shapes import dataset_shapes as shapes_of_file

    if kind != "formatted" or not dataset:
        return None
    try:
        return shapes_of_file(find_dataset(dataset))
    except DashboardError:
        return None


def data_options(kind: str, dataset: str | None, values: dict[str, Any], base_model: str) -> dict[str, Any]:
    """The Data page's choices as training parameters: the dataset in its kind's field, the other one empty."""
    other = next(k for k in KINDS if k != kind)
    return {"base_model": base_model, **values, DATASET_FIELD[kind]: dataset or "", DATASET_FIELD[other]: ""}


# ---- the preview's numbers and tables --------------------------------------------------------------
def preview_metrics(preview: Preview) -> list[list[tuple[str, str]]]:
    """Rows of (name, value) for the preview's statistics."""
    stats = preview.stats

    def n(key: str) -> str:
        return f"{stats.get(key, 0):,}"

    mean = f"{stats.get('mean_tokens', 0):.1f}"
    if preview.kind == "raw":
        return [[("Samples", n("samples")), ("Tokens", n("tokens")), ("Trained tokens", n("trained_tokens")),
                 ("Mean length", mean), ("Max length", n("max_tokens")), ("Dropped blocks", n("dropped_blocks"))]]
    return [[("Rows", n("rows")), ("Samples", n("samples")), ("Unmatched rows", n("unmatched_rows")),
             ("Truncated", n("truncated_samples")), ("Dropped over cutoff", n("dropped_overlong"))],
            [("Tokens", n("tokens")), ("Trained tokens", n("trained_tokens")), ("Mean length", mean),
             ("Max length", n("max_tokens")), ("Chat rows skipped", n("chat_rows_skipped"))]]


def preview_caption(preview: Preview) -> str:
    """The line under the numbers: where the raw samples come from, or which format keys matched."""
    stats = preview.stats
    if preview.kind == "raw":
        return (f"{stats['files']:,} file(s), {stats['blocks']:,} block(s) after cutting at the hard cut string; "
                f"{stats['kept_blocks']:,} kept.")
    keys = stats.get("matched_keys") or {}
    return "Matched format keys: " + ", ".join(f"`{k}` × {count}" for k, count in keys.items()) if keys else ""


def problem_rows(preview: Preview) -> list[dict[str, str]]:
    """The problem table: where, reason and the row's fields."""
    return [{"where": p.where, "reason": p.reason, "fields": ", ".join(p.fields)} for p in preview.problems]


def page_range(total: int, size: int, page: int) -> tuple[int, int, int]:
    """(number of pages, first index, end index) of page `page` (from 1, kept inside the pages)."""
    pages = max(1, math.ceil(total / size))
    first = (min(max(page, 1), pages) - 1) * size
    return pages, first, min(first + size, total)


def sample_details(sample: Sample, kind: str) -> list[str]:
    """A sample card's header after its source: its length, and its overlap or trained tokens."""
    details = [f"{sample.n_tokens:,} tokens"]
    if kind == "raw":
        details.append(f"overlap {sample.overlap} with the previous chunk" if sample.overlap else "no overlap")
    else:
        details.append(f"{sample.n_trained:,} trained")
        if sample.truncated:
            details.append("<b>truncated</b>")
    return details


def token_runs(sample: Sample, kind: str, bos: int, special_ids: set[int]) -> list[tuple[int, int, str]]:
    """The sample's tokens as runs (start, end, style) that are highlighted alike: "special" (one token each),
    "overlap" (shared with the previous chunk, after the `bos` BOS tokens), "plain" (raw text), "trained" or
    "masked"."""
    ids, mask = sample.input_ids, sample.label_mask
    overlap = sample.overlap if kind == "raw" else 0

    def style(position: int) -> str:
        if ids[position] in special_ids:
            return "special"
        if bos <= position < bos + overlap:
            return "overlap"
        if kind == "raw":
            return "plain"
        return "trained" if mask[position] else "masked"

    runs, start = [], 0
    for position in range(1, len(ids) + 1):
        if position == len(ids) or style(position) != style(start) or style(start) == "special":
            runs.append((start, position, style(start)))
            start = position
    return runs


# ---- the Train page's plan -------------------------------------------------------------------------
def training_plan(params, tokenizer) -> dict[str, Any]:
    """Samples, packed rows, tokens, accumulation, steps per epoch, total steps and warm-up steps of these
    parameters on the processes they ask for; `problems`: why the run would refuse to start (batching.
    start_problems, the trainer's own list), each naming its field; `warnings`: what is said but not refused (a
    learning rate far above LoRA's range, checkpoints that will not fit the disk); `footprint`: the disk space
    the run will take (trainer/footprint.py), or None, with `footprint_error` saying why."""
    from . import batching, footprint
    from .samplecache import cached_build_samples

    preview, _ = cached_build_samples(params, tokenizer)
    plan = batching.plan([s.n_tokens for s in preview.samples], params)
    problems = batching.start_problems(params, preview, plan["rows"], plan["total_steps"], params.num_processes)
    warnings = batching.start_warnings(params)
    try:
        plan["footprint"], plan["footprint_error"] = footprint.estimate(params, plan["total_steps"]), None
        if (disk := plan["footprint"].warning()) is not None:
            warnings.append(disk)
    except (DashboardError, OSError) as exc:
        plan["footprint"], plan["footprint_error"] = None, getattr(exc, "message", None) or str(exc)
    plan["memory"], plan["memory_error"] = _memory(params, warnings)
    plan.update(tokens=preview.stats["tokens"], problems=problems, warnings=warnings)
    return plan


def memory_sentence(plan: dict) -> str:
    """The plan's memory line: the estimate for the CPU and for a GPU, beside what is free here."""
    from .memory import size_text

    found = plan.get("memory")
    if not found:
        return f"Memory: not estimated ({plan.get('memory_error')})."
    free = found["free"]
    gpu = f"; {size_text(free['cuda:0'])} free on GPU 0" if "cuda:0" in free else ""
    return (f"Memory on the CPU: {found['cpu'].describe()}, {size_text(free['cpu'])} free here. On a GPU: "
            f"{found['gpu'].describe()}{gpu}.")


def _memory(params, warnings: list) -> tuple[dict | None, str | None]:
    """The memory estimate for the CPU and a GPU (trainer/memory.py) with this machine's free memory, and a
    warning when the run will not fit the device it runs on here."""
    from . import memory

    try:
        found = {"cpu": memory.estimate(params, "cpu"), "gpu": memory.estimate(params, "gpu"),
                 "free": memory.available_memory()}
    except (DashboardError, OSError, ValueError) as exc:
        return None, getattr(exc, "message", None) or str(exc)
    device, free = ("gpu", found["free"]["cuda:0"]) if "cuda:0" in found["free"] else ("cpu", found["free"]["cpu"])
    needed = found[device].per_process if device == "gpu" else found[device].total
    if needed > free:
        where = "GPU memory" if device == "gpu" else "memory"
        warnings.append(DashboardError(
            f"This run needs about {memory.size_text(needed)} of {where}, but only {memory.size_text(free)} is free "
            f"here: lower the micro batch size or the cutoff, or turn on gradient checkpointing or a 4-bit base "
            f"model.", field="micro_batch_size"))
    return found, None
