"""Progress lines for long model steps: a forward (or a training step) at 16K tokens on a CPU takes minutes, and
nothing the package runs may stay silent that long. Used by the apps and by ``lr2kernels.train``."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

__all__ = ["Heartbeat"]


class Heartbeat:
    """While a long step runs, a line every ``every`` seconds: elapsed time and how far the model has got (forwards
    run, the layer the running forward is in), so that no step runs silent. Use as a context manager; the lines
    are printed from a background thread and stop when the block ends."""

    def __init__(self, label: str, model: torch.nn.Module | None = None, every: float = 10.0, indent: str = "      "):
        self.label, self.model, self.every, self.indent = label, model, every, indent
        self.forwards, self.layer, self.num_layers = 0, 0, 0
        self._stop = threading.Event()
        self._handles: list[Any] = []

    def _watch(self) -> None:
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if layers is None:
            return
        self.num_layers = len(layers)

        def entered(index: int):
            def hook(module, args):
                if index == 0:
                    self.forwards += 1
                self.layer = index + 1

            return hook

        self._handles = [layer.register_forward_pre_hook(entered(i)) for i, layer in enumerate(layers)]

    def _beat(self) -> None:
        start = time.perf_counter()
        while not self._stop.wait(self.every):
            where = f", forward {self.forwards}, layer {self.layer}/{self.num_layers}" if self.num_layers else ""
            print(f"{self.indent}... {self.label}: {time.perf_counter() - start:.0f} s{where}", flush=True)

    def __enter__(self) -> Heartbeat:
        self._watch()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for handle in self._handles:
            handle.remove()
