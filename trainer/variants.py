"""The PEFT variants a run can ask for, each through peft's or transformers' own code: DoRA and rsLoRA
(LoraConfig options), PiSSA and OLoRA initialisation, LoRA+ (peft's create_loraplus_optimizer) and NEFTune
(transformers' hook on the input embeddings).

PiSSA and OLoRA move the top of each adapted base weight into the adapter: training runs on the residual base
weights. What is saved (the final adapter and every checkpoint's) is converted by peft
(`path_initial_model_for_weight_conversion`) into a plain LoRA of twice the rank that gives the trained model
on the original base, so every reader of an adapter (evaluation, merge, export) needs nothing special. The
conversion needs the adapter as it was before the first step, kept in the run folder as `initial_adapter/`;
a checkpoint also keeps the adapter as trained in `training_adapter/`, which a resume continues from: peft
loads it by running the same (deterministic) decomposition on the original base, so the residual weights are
the run's own.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .errors import DashboardError

INITIAL_ADAPTER = "initial_adapter"    # in the run folder: the PiSSA/OLoRA adapter before training
TRAINING_ADAPTER = "training_adapter"  # in a checkpoint: the adapter as trained, on the residual base weights
BASE_CHANGING_INITS = ("pissa", "olora")


def lora_config_options(params) -> dict:
    """The LoraConfig options of the variants the parameters ask for."""
    return {"use_dora": params.use_dora, "use_rslora": params.use_rslora,
            "init_lora_weights": True if params.lora_init == "default" else params.lora_init}


def changes_base_weights(peft_model) -> bool:
    """Whether the adapter was initialised by PiSSA or OLoRA, which rewrite the base weights."""
    init = peft_model.peft_config["default"].init_lora_weights
    return isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS)


def save_initial_adapter(peft_model, run_dir: Path) -> None:
    """run_dir/initial_adapter/: the PiSSA/OLoRA adapter before any step, marked as a plain LoRA (as peft's
    conversion requires, so loading it does not decompose the base weights again)."""
    config = peft_model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        peft_model.save_pretrained(Path(run_dir) / INITIAL_ADAPTER)
    finally:
        config.init_lora_weights = init


def save_adapter(peft_model, folder: Path, run_dir: Path, adapter_state: dict | None = None,
                 resumable: bool = False) -> None:
    """The adapter in `folder`, always one that gives the trained model on the original base model. A PiSSA or
    OLoRA adapter is converted by peft against run_dir/initial_adapter/; with `resumable` (a checkpoint) the
    adapter as trained goes into folder/training_adapter/ too, for a resume."""
    import torch

    folder = Path(folder)
    if not changes_base_weights(peft_model):
        peft_model.save_pretrained(folder, state_dict=adapter_state)
        return
    initial = initial_adapter_of(run_dir)
    if resumable:
        peft_model.save_pretrained(folder / TRAINING_ADAPTER, state_dict=adapter_state)
    # The conversion loads the initial adapter beside the trained one and deletes it again. Creating its layers
    # draws random numbers, and loading it puts the model in eval mode: the generator and every module's mode
    # are put back, so saving never changes what the run does next.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    modes = [(module, module.training) for module in peft_model.modules()]
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*changes the base weights.*")
        peft_model.save_pretrained(folder, state_dict=adapter_state,
                                   path_initial_model_for_weight_conversion=str(initial))
    for module, training in modes:
        module.training = training


def initial_adapter_of(run_dir: Path) -> Path:
    """run_dir/initial_adapter/, or a sentence when it is missing (the saved adapters cannot be converted)."""
    initial = Path(run_dir) / INITIAL_ADAPTER
    if not (initial / "adapter_model.safetensors").is_file():
        raise DashboardError(
            f"{Path(run_dir).name}/{INITIAL_ADAPTER}/ is missing: a PiSSA or OLoRA run needs the adapter it started "
            f"from to convert what it saves for the original base model. Start the run anew.")
    return initial


def adapter_to_resume(checkpoint: Path) -> Path:
    """The folder a resume loads the adapter from: the checkpoint's adapter as trained when it has one."""
    trained = Path(checkpoint) / TRAINING_ADAPTER
    return trained if trained.is_dir() else Path(checkpoint)


def start_neftune(peft_model, noise_alpha: float):
    """NEFTune through transformers' own hook on the input embeddings (as its Trainer registers it): noise
    while the model is in training mode only, so evaluation is untouched. It draws from torch's generator,
    whose state every checkpoint saves, so a resumed run draws the same noise. Returns the hook (None: off)."""
    if not noise_alpha:
        return None
    from transformers.integrations.neftune import activate_neftune

    return activate_neftune(peft_model, noise_alpha)


def stop_neftune(peft_model, hook) -> None:
    if hook is not None:
        from transformers.integrations.neftune import deactivate_neftune

        deactivate_neftune(peft_model, hook)


def loraplus_optimizer(peft_model, optimizer_cls, lr: float, ratio: float, weight_decay: float, **options):
    """LoRA+ through peft's create_loraplus_optimizer: parameter groups with the B matrices (and 1-D
    parameters such as DoRA's magnitudes) at `ratio` x the learning rate. The groups are built from the
    model's named parameters in order, so a resumed run's optimiser state matches them."""
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(peft_model, optimizer_cls, lr=lr, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=weight_decay, **options)
