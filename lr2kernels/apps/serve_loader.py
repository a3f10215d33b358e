"""The model loader of ``lr2kernels serve``: transformers serve's own, with ``attn_implementation="lr2kernels"``.

transformers serve (5.25) loads each model in a process of its own, started with multiprocessing's spawn, which
unpickles the server's loader: unpickling this class imports this module, and with it lr2kernels, which installs the
name in that process's transformers (lr2kernels/hf/loading.py). Imports transformers' serving modules: imported by
``lr2kernels serve`` only once its checks have passed.
"""

from __future__ import annotations

import sys
from typing import Any

from transformers.cli.serving.model_manager import ModelLoader

from lr2kernels.hf import is_patched, loading, patch
from lr2kernels.hf.attention import ATTENTION_NAME
from lr2kernels.tables import RopeTable


class Lr2ModelLoader(ModelLoader):
    """transformers serve's ``ModelLoader``, every model loaded with the lr2kernels attention.

    Args:
        table: the path of a saved :class:`~lr2kernels.RopeTable` (``table.json``) to run instead of the model's own
            RoPE, read in the model's process; default :attr:`default_table`.
        backend: the lr2kernels backend ("torch", "triton", "cuda"); default :attr:`default_backend` (None: the best
            available).
        The rest: ``ModelLoader``'s (``attn_implementation`` is lr2kernels', whatever is given).

    transformers serve builds its loader as ``ModelLoader(device=..., ...)``, so ``lr2kernels serve`` gives the
    table and backend as the class's defaults (in its own process, for the time the server runs). The instance keeps
    them: the model's process gets them with the pickled loader.
    """

    default_table: str | None = None
    default_backend: str | None = None

    def __init__(self, *args: Any, table: str | None = None, backend: str | None = None, **kwargs: Any) -> None:
        kwargs["attn_implementation"] = None  # ModelLoader checks the name against those it knows: ours is set after
        super().__init__(*args, **kwargs)
        self.attn_implementation = ATTENTION_NAME
        self.table = self.default_table if table is None else table
        self.backend = self.default_backend if backend is None else backend

    def _load_model(self, model_id: str, *args: Any, **kwargs: Any):
        loading.install()  # installed already by import lr2kernels; said here so that it is never left to chance
        model = super()._load_model(model_id, *args, **kwargs)
        if not is_patched(model):  # from_pretrained ignored the request: refuse rather than serve the stock model
            raise RuntimeError(
                f"lr2kernels serve: {model_id} loaded as {type(model).__name__}, which is not patched by lr2kernels"
            )
        if self.table is not None or self.backend is not None:
            table = None if self.table is None else RopeTable.load(self.table)
            patch(model, table=table, backend=self.backend)
        print(
            f"lr2kernels serve: {model_id} ({type(model).__name__}) runs the lr2kernels attention, with "
            f"{'the table ' + self.table if self.table else 'its own RoPE'}, backend {self.backend or 'auto'}",
            file=sys.stderr,
            flush=True,
        )
        return model
