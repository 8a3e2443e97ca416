"""The disk space a run will take: its adapter, one checkpoint and all the checkpoints it keeps, beside the
free space of the filesystem that holds loras/ (the Train page's plan, `python -m trainer train`).

The adapter's size follows from the shapes of the layers LoRA targets: a linear layer of `n_in` inputs and
`n_out` outputs gets A (rank x n_in) and B (n_out x rank), rank x (n_in + n_out) numbers. The shapes are read
from the model itself built on PyTorch's meta device (no weights are read or allocated), or, where that fails,
from config.json's sizes. A checkpoint (trainer/checkpoints.py) holds the adapter in float32, the optimiser's
state (AdamW: two numbers per trained number), and small files (model card, configs, scheduler, RNG states).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import DashboardError

# Bytes of optimiser state per trained number (bitsandbytes keeps tensors under 4096 numbers in 32 bit).
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8.0, "paged_adamw_32bit": 8.0, "adamw_bnb_8bit": 2.03,
                         "paged_adamw_8bit": 2.03, "sgd": 0.0}
BNB_32BIT_BELOW = 4096
# Measured on checkpoints of the tiny test model (safetensors 0.7, torch 2.13, peft 0.18):
SAFETENSORS_PER_TENSOR = 128  # a tensor's header entry in adapter_model.safetensors
OPTIMIZER_PER_TENSOR = 850  # a trained tensor's entries (exp_avg, exp_avg_sq, step) in optimizer.pt
ADAPTER_FILES = 6_400  # README.md (peft's model card) and adapter_config.json
CHECKPOINT_FILES = 11_900  # rng_state.pt, scheduler.pt and trainer_state.json


@dataclass(frozen=True)
class Footprint:
    adapter_parameters: int  # numbers the adapter trains
    adapter_bytes: int  # the final adapter: adapter_model.safetensors, adapter_config.json, README.md
    checkpoint_bytes: int  # one checkpoint-STEP/ folder
    saves: int  # checkpoints the run writes (every save_steps steps before the last)
    kept: int  # checkpoints on disk at the end (save_total_limit deletes older ones)
    peak_bytes: int  # the most the run's adapter and checkpoints take at once
    free_bytes: int  # free space on the filesystem of `folder`
    folder: str  # where the run folder goes (loras/)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.free_bytes

    def describe(self) -> str:
        """One line for the plan."""
        checkpoints = (f"{self.kept} checkpoint{'s' * (self.kept != 1)} kept x {size_text(self.checkpoint_bytes)}"
                       + (f" (of {self.saves} saved)" if self.saves > self.kept else "")) if self.saves else \
            f"no checkpoints (one would take {size_text(self.checkpoint_bytes)})"
        return (f"Disk: adapter {size_text(self.adapter_bytes)} ({self.adapter_parameters:,} parameters), "
                f"{checkpoints}; up to {size_text(self.peak_bytes)} in all, {size_text(self.free_bytes)} free "
                f"where loras/ is.")

    def warning(self) -> DashboardError | None:
        """A sentence when the run's files will not fit the free space, under the field that helps most."""
        if self.fits:
            return None
        return DashboardError(
            f"The run needs up to {size_text(self.peak_bytes)} for its adapter and {self.kept} checkpoint"
            f"{'s' * (self.kept != 1)} of {size_text(self.checkpoint_bytes)}, but only "
            f"{size_text(self.free_bytes)} is free on the filesystem of {self.folder}. Keep fewer checkpoints "
            f"(keep the last n checkpoints), save less often, or free space.",
            field="save_total_limit" if self.saves else "lora_rank")


def size_text(n_bytes: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.3g} {unit}"
    return f"{int(n_bytes)} B"


def estimate(params, total_steps: int, folder: Path | None = None) -> Footprint:
    """The disk footprint of a run of these parameters and `total_steps` steps, in `folder` (default loras/).
    Raises DashboardError when the model's layers cannot be read."""
    from .home import loras_dir

    shapes = adapted_shapes(params)
    if not shapes:
        raise DashboardError("No layer of the model matches the target modules.", field="target_modules")
    rank = params.lora_rank
    tensors = [(rank, n_in) for _, n_in, _ in shapes] + [(n_out, rank) for _, _, n_out in shapes]
    numbers = sum(rows * cols for rows, cols in tensors)
    adapter = 4 * numbers + SAFETENSORS_PER_TENSOR * len(tensors) + ADAPTER_FILES
    checkpoint = int(adapter + sum(optimizer_state_bytes(params.optimizer, r, c) for r, c in tensors)
                     + OPTIMIZER_PER_TENSOR * len(tensors) + CHECKPOINT_FILES)
    saves = (total_steps - 1) // params.save_steps if params.save_steps else 0
    limit = getattr(params, "save_total_limit", 0)
    kept = min(saves, limit) if limit else saves
    at_once = min(saves, limit + 1) if limit else saves  # a newer one is complete before the oldest goes
    where = Path(folder) if folder is not None else loras_dir()
    return Footprint(numbers, adapter, checkpoint, saves, kept, at_once * checkpoint + adapter,
                     free_space(where), str(where))


def optimizer_state_bytes(optimizer: str, rows: int, cols: int) -> float:
    """Bytes of optimiser state for one trained tensor of rows x cols numbers."""
    if optimizer == "adafactor":
        return 4.0 * (rows + cols)  # factored second moment: a row and a column vector
    per_number = OPTIMIZER_STATE_BYTES.get(optimizer, 8.0)
    if per_number < 4 and rows * cols < BNB_32BIT_BELOW:
        per_number = 8.0
    return per_number * rows * cols


def free_space(folder: Path) -> int:
    """Free bytes on the filesystem of `folder` (or of its nearest existing parent: loras/ may not exist yet)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def adapted_shapes(params) -> list[tuple[str, int, int]]:
    """(name, inputs, outputs) of every layer LoRA adapts, resolved per architecture (trainer/targets.py) from
    the model built on the meta device; for a model transformers cannot build, from config.json's sizes as a
    Llama-like model has them."""
    from .models import model_path
    from .targets import ModelLayers, adapted_layers, model_layers, target_modules_for

    try:
        layers = model_layers(params.base_model, params.trust_remote_code)
    except DashboardError:
        folder = model_path(params.base_model, progress=lambda message: None)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        shapes = tuple(config_shapes(config))
        layers = ModelLayers("", shapes, None, frozenset(name for name, _, _ in shapes))
        return adapted_layers(layers, params.lora_target_modules())
    return adapted_layers(layers, target_modules_for(layers, params.target_modules, params.custom_target_modules))


def config_shapes(config: dict) -> list[tuple[str, int, int]]:
    """The attention and MLP layers of a Llama-like decoder from config.json's sizes."""
    config = {**config, **(config.get("text_config") or {})}
    try:
        hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        heads = int(config.get("num_attention_heads") or 1)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inner = int(config.get("intermediate_size") or 4 * hidden)
    except (KeyError, TypeError, ValueError):
        raise DashboardError("config.json gives no layer sizes (hidden_size, num_hidden_layers).",
                             field="base_model") from None
    layer = [("self_attn.q_proj", hidden, heads * head_dim), ("self_attn.k_proj", hidden, kv_heads * head_dim),
             ("self_attn.v_proj", hidden, kv_heads * head_dim), ("self_attn.o_proj", heads * head_dim, hidden),
             ("mlp.gate_proj", hidden, inner), ("mlp.up_proj", hidden, inner), ("mlp.down_proj", inner, hidden)]
    return [(f"model.layers.{i}.{name}", n_in, n_out) for i in range(layers) for name, n_in, n_out in layer]
