"""Which layers LoRA adapts, per architecture: the target-module choice (params.TARGET_MODULE_CHOICES) resolved
against the model's own layer names.

The choices name roles: q and v, q k v and o, every linear layer, or a custom list. Families name those layers
differently. Llama, Mistral, Qwen and Gemma have `q_proj`, `k_proj`, `v_proj`, `o_proj`; GPT-2 computes q, k and v
in one layer `c_attn` (a Conv1D, not an nn.Linear) and its attention output is `attn.c_proj` (`mlp.c_proj` is the
MLP's); Phi-3 fuses them in `qkv_proj`; GPT-NeoX in `query_key_value`, with `dense` as the attention output. A fused
layer cannot adapt q and v without k, so q-v adapts the whole fused layer and the names shown say so. Where this
module knows none of a family's names, q-v falls back to peft's own table (TRANSFORMERS_MODELS_TO_LORA_TARGET_
MODULES_MAPPING, peft's default targets per model type). "all-linear" is passed to peft as it is: peft adapts every
nn.Linear and Conv1D but the output layer, and `adapted_layers` lists the same ones.

The layers are read from the model built on PyTorch's meta device (no weights are read or allocated), or from the
loaded model itself when the trainer builds the adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .errors import DashboardError

# Attention projections by role, as the families name them (the leaf name of the module).
ROLE_NAMES = {
    "q": ("q_proj", "query", "q", "wq"),
    "k": ("k_proj", "key", "k", "wk"),
    "v": ("v_proj", "value", "v", "wv"),
    "qkv": ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack"),
    "o": ("o_proj", "out_proj", "dense", "c_proj", "wo"),
}
FUSED_NOTE = "q, k and v in one layer: q-v adapts k too"


@dataclass(frozen=True)
class ModelLayers:
    """What target resolution needs to know of a model: its linear layers and module names, no weights."""

    model_type: str
    layers: tuple[tuple[str, int, int], ...]  # every nn.Linear and Conv1D: (name, inputs, outputs)
    output_layer: str | None  # the output head's module name: "all-linear" never adapts it
    module_names: frozenset[str]  # every module's full name (a custom target may be any of them)

    def has_target(self, target: str) -> bool:
        """Whether peft finds `target`: a module whose name is it or ends with "." and it."""
        return any(name == target or name.endswith("." + target) for name in self.module_names)

    def linear_leaf_names(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name, _, _ in self.layers if name != self.output_layer})


def layers_of(model) -> ModelLayers:
    """The layers of a built model (a loaded one, a PeftModel's base, or one on the meta device)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    layers, names, output = [], [], None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        names.append(name)
        if module is head and head is not None:
            output = name
        if isinstance(module, torch.nn.Linear):
            layers.append((name, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):  # GPT-2's layers: weight is (inputs x outputs)
            layers.append((name, int(module.weight.shape[0]), int(module.nf)))
    config = getattr(model, "config", None)
    return ModelLayers(str(getattr(config, "model_type", "") or ""), tuple(layers), output, frozenset(names))


def layers_of_config(config, trust_remote_code: bool = False) -> ModelLayers:
    """The layers of the model a transformers config describes, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return layers_of(model)


def model_layers(base_model: str, trust_remote_code: bool = False) -> ModelLayers:
    """The layers of a model under models/ (by picker name), read from its config without loading weights."""
    from .models import model_path

    folder = model_path(base_model, progress=lambda message: None)
    return _layers_of_folder(str(folder), (folder / "config.json").stat().st_mtime_ns, trust_remote_code)


@lru_cache(maxsize=16)
def _layers_of_folder(folder: str, config_mtime: int, trust_remote_code: bool) -> ModelLayers:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        return layers_of_config(config, trust_remote_code)
    except Exception as exc:  # transformers raises many kinds for a model it cannot build
        hint = "" if trust_remote_code else " If the model needs its own code, tick Trust remote code."
        raise DashboardError(f"Cannot read the layers of {folder.rsplit('/', 1)[-1]}: {exc}.{hint}",
                             field="base_model") from None


def _as_layers(model_or_config) -> ModelLayers:
    if isinstance(model_or_config, ModelLayers):
        return model_or_config
    if hasattr(model_or_config, "named_modules"):
        return layers_of(model_or_config)
    return layers_of_config(model_or_config)


def _attention_roles(layers: ModelLayers) -> dict[str, str]:
    """role ("q", "k", "v", "qkv", "o") -> the target name peft matches, for the attention layers found. A leaf
    name that also names a layer outside attention (GPT-2's c_proj) is qualified with its parent ("attn.c_proj")."""
    inside, outside = {}, set()
    for name, _, _ in layers.layers:
        parent, _, leaf = name.rpartition(".")
        parent_leaf = parent.rsplit(".", 1)[-1].lower()
        if "attn" in parent_leaf or "attention" in parent_leaf:
            inside.setdefault(leaf, parent.rsplit(".", 1)[-1])
        else:
            outside.add(leaf)
    roles = {}
    for role, names in ROLE_NAMES.items():
        leaf = next((n for n in names if n in inside), None)
        if leaf is not None:
            roles[role] = f"{inside[leaf]}.{leaf}" if leaf in outside else leaf
    return roles


def _peft_default(layers: ModelLayers) -> list[str] | None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TABLE

    found = PEFT_TABLE.get(layers.model_type)
    return list(found) if found and all(layers.has_target(t) for t in found) else None


def resolve_targets(model_or_config, choice: str, custom: str = "") -> tuple[list[str] | str, dict[str, str]]:
    """(what peft's LoraConfig gets as target_modules, {target: note} for the targets that adapt more than the
    choice names). `model_or_config`: a model, a transformers config or ModelLayers. Raises DashboardError
    when the choice cannot be honoured on this model."""
    from .params import TARGET_MODULE_CHOICES

    if choice not in TARGET_MODULE_CHOICES:
        raise DashboardError(f"Target modules must be one of {', '.join(TARGET_MODULE_CHOICES)}; got {choice!r}.",
                             field="target_modules")
    if choice == "all-linear":
        return "all-linear", {}
    layers = _as_layers(model_or_config)
    if choice == "custom":
        targets = [m.strip() for m in custom.split(",") if m.strip()]
        missing = [t for t in targets if not layers.has_target(t)]
        if not targets or missing:
            said = f"The model has no module named {', '.join(missing)}." if missing else "No module listed."
            raise DashboardError(f"{said} Its linear layers include: {', '.join(layers.linear_leaf_names())}.",
                                 field="custom_target_modules")
        return targets, {}
    roles = _attention_roles(layers)
    wanted = ["q", "v"] if choice == "q-v" else ["q", "k", "v", "o"]
    if all(r in roles for r in wanted):
        return [roles[r] for r in wanted], {}
    if "qkv" in roles and (choice == "q-v" or "o" in roles):
        if choice == "q-v":
            return [roles["qkv"]], {roles["qkv"]: FUSED_NOTE}
        return [roles["qkv"], roles["o"]], {}
    fallback = _peft_default(layers) if choice == "q-v" else None
    if fallback:
        return fallback, {t: "peft's default targets for this model type" for t in fallback}
    raise DashboardError(
        f"Target modules {choice}: no attention {'q and v' if choice == 'q-v' else 'q, k, v and o'} layers found "
        f"in this model ({layers.model_type or 'unknown type'}). Choose all-linear, or custom with some of its "
        f"linear layers: {', '.join(layers.linear_leaf_names())}.", field="target_modules")


def target_modules_for(model_or_config, choice: str, custom: str = "") -> list[str] | str:
    """The target_modules for peft's LoraConfig: a list of names peft matches, or "all-linear"."""
    return resolve_targets(model_or_config, choice, custom)[0]


def adapted_layers(layers: ModelLayers, targets) -> list[tuple[str, int, int]]:
    """The linear layers peft adapts for `targets` (as target_modules_for gives them), matched as peft matches."""
    if targets == "all-linear":
        return [s for s in layers.layers if s[0] != layers.output_layer]
    return [s for s in layers.layers if any(s[0] == t or s[0].endswith("." + t) for t in targets)]


_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def _within_block(name: str) -> tuple[str | None, str]:
    """("model.layers.3", "self_attn.q_proj") for "model.layers.3.self_attn.q_proj"; (None, name) outside blocks.
    Deeper numbers (experts) become "*"."""
    found = _BLOCK.match(name)
    if not found:
        return None, name
    return f"{found[1]}.{found[2]}", re.sub(r"\.\d+\.", ".*.", "." + found[3] + ".").strip(".")


def shown_names(layers: ModelLayers, targets, notes: dict[str, str]) -> list[str]:
    """The adapted layers as the Train page shows them: each distinct name within a decoder block, in model order,
    with a note in brackets where the layer adapts more than the choice names."""
    shown: list[str] = []
    for name, _, _ in adapted_layers(layers, targets):
        inner = _within_block(name)[1]
        note = next((text for target, text in notes.items() if name == target or name.endswith("." + target)), "")
        label = f"{inner} ({note})" if note else inner
        if label not in shown:
            shown.append(label)
    return shown


def target_module_names(base_model_name: str, choice: str, custom: str = "",
                        trust_remote_code: bool = False) -> list[str]:
    """The modules LoRA will adapt in `base_model_name` (one decoder block's names, e.g. "self_attn.q_proj"),
    for the Train page; a fused layer standing in for separate ones carries a note in brackets."""
    layers = model_layers(base_model_name, trust_remote_code)
    targets, notes = resolve_targets(layers, choice, custom)
    return shown_names(layers, targets, notes)


def describe_targets(base_model_name: str, choice: str, custom: str = "", trust_remote_code: bool = False) -> str:
    """One sentence for the Train page: which modules, in how many blocks, how many layers in all."""
    layers = model_layers(base_model_name, trust_remote_code)
    targets, notes = resolve_targets(layers, choice, custom)
    adapted = adapted_layers(layers, targets)
    blocks = {_within_block(name)[0] for name, _, _ in adapted} - {None}
    names = shown_names(layers, targets, notes)
    where = f" in each of {len(blocks)} blocks" if blocks else ""
    return f"LoRA adapts {len(adapted)} layers: {', '.join(names)}{where}."

