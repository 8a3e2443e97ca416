"""Export: merge a LoRA adapter into its base model and save a plain safetensors model folder in models/.

The merged model is checked twice against base+adapter on a sample input: in memory right after
`merge_and_unload`, and once more after loading the saved folder back with transformers. The folder is
written under a temporary name and renamed into place only when both checks pass; an existing folder is
never replaced.

The check scales with the logits: merging changes the order of float32 sums, so the logits of the merged
model differ from base+adapter by rounding that grows with the model (8.4e-5 on the 135M default model,
whose logits have a standard deviation of about 7). The largest difference must stay under
RELATIVE_TOLERANCE times the standard deviation of the base+adapter logits (0.1%: about 7e-3 for the 135M
model, a hundred times its rounding), computed in float64. A wrong merge moves logits by about the
adapter's own effect (a tenth of that spread for a trained adapter) and fails it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import DashboardError
from .home import check_name, models_dir
from .runfiles import now_iso
from .storage import lock_beside, named_lock, read_json, write_json_atomic

SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog. A LoRA adapter changes a few weight matrices; "
               "merged into the base model it must give the same predictions.")
RELATIVE_TOLERANCE = 1e-3


def check_export_target(name: str) -> Path:
    """models/NAME for a new merged model; refuses unsafe names and existing folders."""
    name = check_name(name, "model name")
    target = models_dir() / name
    if target.exists():
        raise DashboardError(f"models/{name} already exists; choose another name (nothing is overwritten).",
                             field="name")
    return target


def adapter_base_model(adapter_dir: Path) -> str:
    """The base model of an adapter folder (a run folder or one of its checkpoints)."""
    from .runtable import run_base_model

    adapter_dir = Path(adapter_dir)
    run_dir = adapter_dir.parent if adapter_dir.name.startswith("checkpoint-") else adapter_dir
    name = run_base_model(run_dir)
    if not name:
        config = read_json(adapter_dir / "adapter_config.json") or {}
        name = Path(str(config.get("base_model_name_or_path") or "")).name
    if not name:
        raise DashboardError(f"Cannot tell which base model {adapter_dir.name} was trained on; choose it.",
                             field="base_model")
    return name


def default_export_name(adapter_dir: Path, ending: str = "merged") -> str:
    """RUN-ENDING, or RUN-checkpoint-STEP-ENDING for a checkpoint's adapter."""
    adapter_dir = Path(adapter_dir)
    if adapter_dir.name.startswith("checkpoint-"):
        return f"{adapter_dir.parent.name}-{adapter_dir.name}-{ending}"
    return f"{adapter_dir.name}-{ending}"


def logits(model, input_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def max_logit_difference(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def logit_scale(reference) -> float:
    """The spread of the base+adapter logits (their standard deviation, in float64) the check scales with."""
    return float(reference.double().std()) if reference.numel() > 1 else float(reference.double().abs().max())


def logit_limit(reference, relative_tolerance: float = RELATIVE_TOLERANCE) -> float:
    """The largest |logit difference| a correct merge may show against `reference` (never 0)."""
    return relative_tolerance * max(logit_scale(reference), 1e-6)


def check_logits(merged_logits, reference, limit: float, what: str) -> float:
    """The largest |difference| between the merged model's logits and base+adapter's; raises when it is not
    under `limit` (nothing is saved then)."""
    difference = max_logit_difference(merged_logits, reference)
    if not difference < limit:
        raise DashboardError(f"{what} logits differ from base+adapter by {difference:.2e}, more than {limit:.1e} "
                             f"({RELATIVE_TOLERANCE:g} of the logits' spread, {limit / RELATIVE_TOLERANCE:.3g}): "
                             f"the merge is wrong; nothing was saved.")
    return difference


def merge_checked(adapter_dir: Path, base_model: str, folder: Path, progress: Callable[[str], None] = print,
                  sample_text: str = SAMPLE_TEXT, relative_tolerance: float = RELATIVE_TOLERANCE) -> dict:
    """Merge the adapter into its base model (full precision), save the merged model into `folder`, and check
    it twice against base+adapter (in memory, then loaded back). Returns the check's numbers with the
    sample's token ids and the base+adapter and base logits (float32 tensors, one row per token)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import attach_adapter, load_model, load_tokenizer

    progress(f"Loading {base_model} and the adapter {Path(adapter_dir).name}...")
    tokenizer = load_tokenizer(base_model, progress=progress)
    model = attach_adapter(load_model(base_model, "full", device="cpu", progress=progress), adapter_dir)
    model.eval()
    input_ids = tokenizer(sample_text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    reference = logits(model, input_ids)
    with model.disable_adapter():
        base_logits = logits(model, input_ids)
    tolerance = logit_limit(reference, relative_tolerance)

    progress("Merging the adapter into the base weights...")
    merged = model.merge_and_unload()
    merged.eval()
    difference = check_logits(logits(merged, input_ids), reference, tolerance, "The merged model's")
    progress("Saving the merged model...")
    merged.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del merged, model
    progress("Loading the saved folder back to check it...")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reloaded.eval()
    reloaded_difference = check_logits(logits(reloaded, input_ids), reference, tolerance, "The saved merged model's")
    return {"max_abs_diff": difference, "max_abs_diff_reloaded": reloaded_difference,
            "adapter_effect": max_logit_difference(reference, base_logits), "logit_scale": logit_scale(reference),
            "relative_tolerance": relative_tolerance, "tolerance": tolerance,
            "token_ids": input_ids[0].tolist(), "reference": reference[0], "base_logits": base_logits[0]}


def export_merged(adapter_dir: Path, name: str, base_model: str | None = None,
                  progress: Callable[[str], None] = print, sample_text: str = SAMPLE_TEXT,
                  relative_tolerance: float = RELATIVE_TOLERANCE) -> dict:
    """Merge the adapter into its base model (full precision) and save models/NAME.

    Returns {"path", "name", "base_model", "adapter", "max_abs_diff", "max_abs_diff_reloaded", "adapter_effect",
    "logit_scale", "relative_tolerance", "tolerance"}: `tolerance` is the absolute limit for this model,
    relative_tolerance times logit_scale.
    """
    from .models import model_path

    adapter_dir = Path(adapter_dir)
    target = check_export_target(name)
    base_model = base_model or adapter_base_model(adapter_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        checked = merge_checked(adapter_dir, base_model, staging, progress, sample_text, relative_tolerance)
        info = {"merged_from": str(adapter_dir), "base_model": base_model,
                "base_model_path": str(model_path(base_model, progress)), "date": now_iso(),
                "max_abs_logit_difference": checked["max_abs_diff_reloaded"], "logit_tolerance": checked["tolerance"],
                "sample_text": sample_text}
        write_json_atomic(staging / "merged_from.json", info)
        staging.chmod(0o755)
        place_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"Saved models/{target.name}: logits match base+adapter within {checked['max_abs_diff_reloaded']:.1e} "
             f"(limit {checked['tolerance']:.1e}).")
    numbers = {k: v for k, v in checked.items() if k not in ("token_ids", "reference", "base_logits")}
    return {"path": str(target), "name": target.name, "base_model": base_model, "adapter": str(adapter_dir),
            **numbers}


def place_folder(staging: Path, target: Path) -> None:
    """Rename a finished staging folder into place; two exports to one name: the second sees the first's."""
    with named_lock(lock_beside(target)):
        if target.exists():
            raise DashboardError(f"models/{target.name} appeared while exporting; nothing was overwritten.")
        staging.rename(target)
