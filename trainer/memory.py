"""How much memory a run will take, before it starts: for the CPU (resident memory) and for a GPU (VRAM).

The parts, for a model of N numbers of which the adapter trains P, a micro batch of B samples of up to T
tokens, L decoder layers of width H, MLP width M and key/value width K, vocabulary V (README "Memory"):

- weights: N x bytes per weight (float32 on the CPU, bfloat16 on a GPU; 8-bit about 1, 4-bit about 0.5 +
  its constants for the linear layers; embeddings and norms stay in the compute precision);
- adapter and optimiser: P x (4 weight + 4 gradient + optimiser state: AdamW 8, 8-bit AdamW 2, SGD 0);
- activations kept for the backward pass, per token and layer: two norms' inputs (2H), attention's q, k, v
  and output (2H + 2K), the MLP's gate, up and activated gate (3M), and the input of each adapted layer
  (twice with dropout: its output and mask); with gradient checkpointing only each layer's input (H) plus
  one layer's worth while it is recomputed;
- the output layer: the chunked loss (trainer/loss.py) holds 256 positions x V logits at a time, about
  three times over (logits, softmax, gradient), plus the hidden states of the trained positions;
- on the CPU, what Python, torch, transformers and peft take before any model (measured), and glibc's
  kept free memory (the trainer keeps freed memory for the next step: a share of the activations);
  several processes (DDP) each hold all of it; FSDP shares the weights among them.

bench/memory_estimate.py checks the CPU estimate against the peak resident memory of real runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .footprint import size_text as _size_text
from .targets import adapted_layers, model_layers, target_modules_for

# Measured (bench/memory_estimate.py, bench/RESULTS.md): resident memory of the trainer process with its
# libraries loaded and no model yet, and the share of the activations glibc keeps between steps.
CPU_BASELINE_BYTES = 420e6
CPU_KEPT_SHARE = 0.5
LOSS_CHUNK_POSITIONS = 256  # trainer/loss.py CHUNK_POSITIONS
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8.0, "paged_adamw_32bit": 8.0, "adamw_bnb_8bit": 2.0,
                         "paged_adamw_8bit": 2.0, "adafactor": 0.1, "sgd": 0.0}


@dataclass(frozen=True)
class MemoryEstimate:
    device: str  # "cpu" or "gpu"
    weights: float
    adapter_and_optimizer: float
    activations: float
    output_layer: float
    runtime: float  # the CPU's libraries and kept free memory; the GPU's is not counted (CUDA context aside)
    processes: int

    @property
    def per_process(self) -> float:
        return self.weights + self.adapter_and_optimizer + self.activations + self.output_layer + self.runtime

    @property
    def total(self) -> float:
        return self.per_process * self.processes

    def parts(self) -> dict[str, float]:
        return {"weights": self.weights, "adapter + optimiser": self.adapter_and_optimizer,
                "activations": self.activations, "output layer": self.output_layer, "runtime": self.runtime}

    def describe(self) -> str:
        where = "RAM" if self.device == "cpu" else "VRAM"
        parts = ", ".join(f"{name} {size_text(value)}" for name, value in self.parts().items() if value)
        each = f" per process x {self.processes}" if self.processes > 1 else ""
        return f"{where} about {size_text(self.total)} ({parts}{each})"


def size_text(n_bytes: float) -> str:
    return _size_text(n_bytes)


# The sizes the estimate reads, by transformers' common names (GPT-2's config.json says n_embd, n_layer, n_head).
CONFIG_SIZES = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")


def _config(base_model: str, trust_remote_code: bool = False) -> dict:
    """config.json's sizes (a multimodal model's text_config's), under their common names where transformers
    maps a family's own keys onto them."""
    from .models import model_path

    folder = model_path(base_model, progress=lambda message: None)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = {**config, **(config.get("text_config") or {})}
    try:
        from transformers import AutoConfig

        text_config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code).get_text_config()
    except Exception:  # a config transformers cannot read: its own keys are all there is
        return config
    for key in CONFIG_SIZES:
        value = getattr(text_config, key, None)
        if isinstance(value, (int, bool)):
            config[key] = value
    return config


def _weight_bytes(shapes, output_layer: str | None, config: dict, precision: str, compute_bytes: int) -> float:
    vocab, hidden = int(config.get("vocab_size") or 0), int(config.get("hidden_size") or 0)
    tied = bool(config.get("tie_word_embeddings", False))
    linear = sum(n_in * n_out for name, n_in, n_out in shapes if not (tied and name == output_layer))
    head = sum(n_in * n_out for name, n_in, n_out in shapes if name == output_layer and not tied)
    body = linear - head
    per_linear = {"full": compute_bytes, "8bit": 1.0, "4bit": 0.5 + 0.03}.get(precision, compute_bytes)
    layers = int(config.get("num_hidden_layers") or 0)
    norms = (2 * layers + 1) * hidden
    return body * per_linear + (head + vocab * hidden + norms) * compute_bytes


def _activation_bytes(config: dict, shapes, tokens: int, compute_bytes: int, dropout: bool,
                      checkpointing: bool) -> float:
    hidden = int(config.get("hidden_size") or 0)
    layers = int(config.get("num_hidden_layers") or 1)
    inner = int(config.get("intermediate_size") or 4 * hidden)
    heads = int(config.get("num_attention_heads") or 1)
    kv = int(config.get("num_key_value_heads") or heads) * int(config.get("head_dim") or hidden // heads)
    per_layer_adapted = sum(n_in for _, n_in, _ in shapes) / max(layers, 1)
    per_token_layer = 2 * hidden + 2 * hidden + 2 * kv + 3 * inner + per_layer_adapted * (2 if dropout else 1)
    if checkpointing:
        return tokens * compute_bytes * (layers * hidden + per_token_layer)
    return tokens * compute_bytes * layers * per_token_layer


def estimate(params, device: str = "cpu") -> MemoryEstimate:
    """The memory a run of these parameters takes on `device` ("cpu" or "gpu"), from the model's config."""
    config = _config(params.base_model, params.trust_remote_code)
    layers = model_layers(params.base_model, params.trust_remote_code)
    adapted = adapted_layers(layers, target_modules_for(layers, params.target_modules, params.custom_target_modules))
    compute_bytes = 4 if device == "cpu" else 2
    sharded = params.num_processes > 1 and params.distributed_strategy == "fsdp"
    weights = _weight_bytes(layers.layers, layers.output_layer, config, params.precision, compute_bytes) / (
        params.num_processes if sharded else 1)
    trained = sum(params.lora_rank * (n_in + n_out) for _, n_in, n_out in adapted)
    optimizer = trained * (8 + OPTIMIZER_STATE_BYTES.get(params.optimizer, 8.0))
    tokens = params.micro_batch_size * params.cutoff_len
    activations = _activation_bytes(config, adapted, tokens, compute_bytes, params.lora_dropout > 0,
                                    params.gradient_checkpointing)
    vocab, hidden = int(config.get("vocab_size") or 0), int(config.get("hidden_size") or 0)
    output = 3 * min(tokens, LOSS_CHUNK_POSITIONS) * vocab * 4 + 2 * tokens * hidden * compute_bytes
    runtime = CPU_BASELINE_BYTES + CPU_KEPT_SHARE * activations if device == "cpu" else 0.0
    return MemoryEstimate(device, weights, optimizer, activations, output, runtime, params.num_processes)


def available_memory() -> dict[str, float]:
    """Free memory now: the CPU's available RAM, and each visible GPU's free VRAM."""
    import psutil

    found = {"cpu": float(psutil.virtual_memory().available)}
    try:
        import torch

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                found[f"cuda:{index}"] = float(torch.cuda.mem_get_info(index)[0])
    except Exception:  # a broken CUDA setup: the CPU figure still stands
        pass
    return found
