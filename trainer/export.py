"""Export: merge a LoRA adapter into its base model and save a plain safetensors model folder in models/.

The merged model is checked twice against base+adapter on a sample input: in memory right after
`merge_and_unload`, and once more after loading the saved folder back with transformers. The folder is
written under a temporary name and renamed into place only when both checks pass; an existing folder is
never replaced.
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
TOLERANCE = 1e-4


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


def default_export_name(adapter_dir: Path) -> str:
    adapter_dir = Path(adapter_dir)
    if adapter_dir.name.startswith("checkpoint-"):
        return f"{adapter_dir.parent.name}-{adapter_dir.name}-merged"
    return f"{adapter_dir.name}-merged"


def logits(model, input_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def max_logit_difference(a, b) -> float:
    return float((a - b).abs().max())


def export_merged(adapter_dir: Path, name: str, base_model: str | None = None,
                  progress: Callable[[str], None] = print, sample_text: str = SAMPLE_TEXT,
                  tolerance: float = TOLERANCE) -> dict:
    """Merge the adapter into its base model (full precision) and save models/NAME.

    Returns {"path", "base_model", "adapter", "max_abs_diff", "max_abs_diff_reloaded", "tolerance"}.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .models import attach_adapter, load_model, load_tokenizer, model_path

    adapter_dir = Path(adapter_dir)
    target = check_export_target(name)
    base_model = base_model or adapter_base_model(adapter_dir)
    progress(f"Loading {base_model} and the adapter {adapter_dir.name}...")
    tokenizer = load_tokenizer(base_model, progress=progress)
    model = attach_adapter(load_model(base_model, "full", device="cpu", progress=progress), adapter_dir)
    model.eval()
    input_ids = tokenizer(sample_text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    reference = logits(model, input_ids)
    with model.disable_adapter():
        base_logits = logits(model, input_ids)
    adapter_effect = max_logit_difference(reference, base_logits)

    progress("Merging the adapter into the base weights...")
    merged = model.merge_and_unload()
    merged.eval()
    difference = max_logit_difference(logits(merged, input_ids), reference)
    if difference >= tolerance:
        raise DashboardError(f"The merged model's logits differ from base+adapter by {difference:.2e} "
                             f"(more than {tolerance:g}); nothing was saved.")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        progress(f"Saving the merged model to models/{target.name}...")
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        del merged, model
        progress("Loading the saved folder back to check it...")
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)
        reloaded.eval()
        reloaded_difference = max_logit_difference(logits(reloaded, input_ids), reference)
        if reloaded_difference >= tolerance:
            raise DashboardError(f"The saved merged model's logits differ from base+adapter by "
                                 f"{reloaded_difference:.2e} (more than {tolerance:g}); nothing was saved.")
        info = {"merged_from": str(adapter_dir), "base_model": base_model,
                "base_model_path": str(model_path(base_model, progress)), "date": now_iso(),
                "max_abs_logit_difference": reloaded_difference, "sample_text": sample_text}
        write_json_atomic(staging / "merged_from.json", info)
        staging.chmod(0o755)
        with named_lock(lock_beside(target)):  # two exports to one name: the second sees the first's folder
            if target.exists():
                raise DashboardError(f"models/{target.name} appeared while exporting; nothing was overwritten.")
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"Saved models/{target.name}: logits match base+adapter within {reloaded_difference:.1e}.")
    return {"path": str(target), "name": target.name, "base_model": base_model, "adapter": str(adapter_dir),
            "max_abs_diff": difference, "max_abs_diff_reloaded": reloaded_difference,
            "adapter_effect": adapter_effect, "tolerance": tolerance}
