"""One base model in memory with any number of its LoRA adapters, loaded by peft and switched between.

Evaluating several checkpoints, or answering with and without an adapter, needs the base model once: peft
puts each adapter's LoRA weights beside the base weights (`load_adapter`), `set_adapter` chooses the one
that computes, and under `disable_adapter()` the base weights alone compute, which gives the same numbers
as the base model by itself.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .models import attach_adapter, load_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FIRST_ADAPTER = "default"  # the name peft gives the adapter a PeftModel is created with


def has_adapter(folder: Path) -> bool:
    """Whether a folder holds a saved PEFT adapter in safetensors (a run folder or a checkpoint)."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()


class BaseWithAdapters:
    """A base model and the adapters asked for so far; `using(folder)` gives the model computing with one.

    An adapter whose weights file changed since it was loaded (a run trained on) is loaded again. A lock
    makes users take turns: one Streamlit server serves every browser tab from threads of one process."""

    def __init__(self, model_name: str, precision: str = "full", progress: Callable[[str], None] = print):
        self.model_name, self.precision = model_name, precision
        self.model = load_model(model_name, precision, progress=progress)
        self.model.eval()
        self.loaded: dict[str, tuple[int, str]] = {}  # adapter folder -> (weights' mtime_ns, adapter name)
        self.loads = 0
        self.lock = threading.RLock()

    @contextmanager
    def using(self, adapter_dir: Path | None) -> Iterator:
        """The model computing with the adapter in `adapter_dir`, or with the base weights alone for None."""
        with self.lock:
            if adapter_dir is None:
                if not self.loaded:
                    yield self.model
                else:
                    with self.model.disable_adapter():
                        yield self.model
                return
            name = self._adapter_name(Path(adapter_dir))  # first: loading the first adapter wraps the model
            self.model.set_adapter(name)
            yield self.model

    def _adapter_name(self, adapter_dir: Path) -> str:
        """The name of the adapter in `adapter_dir`, loading it first when it is new or its weights changed."""
        key = str(adapter_dir.resolve())
        weights = adapter_dir / ADAPTER_WEIGHTS
        stamp = weights.stat().st_mtime_ns if weights.is_file() else 0
        known = self.loaded.get(key)
        if known is not None and known[0] == stamp:
            return known[1]
        if not self.loaded:
            # attach_adapter checks the folder and names a base model mismatch in words.
            self.model = attach_adapter(self.model, adapter_dir)
            self.model.eval()
            name = FIRST_ADAPTER
        else:
            name = self._load_another(adapter_dir)
        self.loaded[key] = (stamp, name)
        if known is not None:  # the weights changed: the old copy goes once the new one is active
            self.model.set_adapter(name)
            self.model.delete_adapter(known[1])
        return name

    def _load_another(self, adapter_dir: Path) -> str:
        self.loads += 1
        name = f"adapter_{self.loads}"
        attach_adapter(self.model, adapter_dir, adapter_name=name)
        return name
