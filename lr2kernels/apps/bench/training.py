"""Training throughput and memory: packed varlen rows (patched) vs the usual padded per-document batches (stock).

The same documents, the same real tokens, one training step (forward + backward) over all of them, three ways:
- ``stock, padded``: stock transformers, documents in batches of ``--docs-per-batch``, each padded to the longest
  document of its batch (the usual per-document batches);
- ``stock, packed``: stock transformers on the packed rows (``position_ids`` restarting per document: transformers
  builds a block-causal mask for SDPA);
- ``patched, packed``: ``lr2kernels.patch`` on the packed rows: the fused varlen kernels, one table per document.

Model: the embedded SmolLM2 (or ``--model``), or ``--config`` a real model's config.json at random weights (speed needs
no trained weights: e.g. a 1B-class llama at 32K tokens per row on a GPU). Rounds alternate providers; the median of
``--reps`` timed rounds is reported after a warm-up round that measures memory: the activations autograd saves
for backward (``saved_mb``, parameters excluded; comparable on any device) and, on a GPU, the allocator's peak.

Run: ``python benchmarks/bench_training.py --seq-len 4096 --rows 2`` (CPU) or ``--config <json> --seq-len 32768``.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from pathlib import Path

import torch

from lr2kernels.apps.bench.report import PeakMemory, environment, show_and_append
from lr2kernels.apps.common import (
    Heartbeat,
    add_device_option,
    add_model_option,
    add_out_option,
    default_dtype,
    device_from,
    fresh_results_folder,
    load_model_quietly,
    make_parser,
    random_model,
    sync,
)
from lr2kernels.tables import RopeTable

COLUMNS = ["provider", "seq_len", "documents", "real_tokens", "computed_tokens", "ms", "tokens_per_s", "saved_mb",
           "peak_mb", "speedup"]  # fmt: skip


def document_lengths(seq_len: int, rows: int, original_length: int, seed: int) -> list[int]:
    """Lengths that fill ``rows`` rows: half of them one long document (> L0) each, half packed short ones."""
    rng = random.Random(seed)
    lengths = []
    for row in range(rows):
        if row % 2:
            lengths.append(rng.randrange(min(original_length + 1, seq_len), seq_len + 1))
        else:
            left = seq_len
            while left >= 16:
                length = min(left, rng.randrange(16, max(17, min(original_length, seq_len // 4))))
                lengths.append(length)
                left -= length
    return lengths


class SavedActivations:
    """Bytes of the tensors autograd keeps for backward during a forward (parameters excluded): the activation
    memory of a training step, measured the same way on any device. On the CPU it is the comparable number (process
    RSS never shrinks, so a peak above the start says little about the second provider of a run)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters and storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor


def _step(model, batches: list[dict], measure: bool = False) -> float:
    """One training step over ``batches`` (forward + backward each); with ``measure``, the largest batch's saved
    activations in MB."""
    model.zero_grad(set_to_none=True)
    largest = 0
    for batch in batches:
        saved = SavedActivations(model)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor) if measure else _nothing():
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        largest = max(largest, saved.bytes)
    return largest / 2**20


@contextlib.contextmanager
def _nothing():
    yield


def run(model, device: torch.device, seq_len: int, rows: int, docs_per_batch: int, reps: int, seed: int) -> list[dict]:
    import lr2kernels as lr2
    from lr2kernels.train import collate, pack_documents

    table = RopeTable.from_hf_config(model.config)
    vocab = model.config.vocab_size
    lengths = document_lengths(seq_len, rows, table.original_max_position, seed)
    generator = torch.Generator().manual_seed(seed)
    documents = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    packed_rows = pack_documents(documents, seq_len=seq_len, original_length=table.original_max_position,
                                 long_fraction=sum(r % 2 for r in range(rows)) / rows, seed=seed)  # fmt: skip
    packed = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([row]).items()} for row in packed_rows]
    padded = []
    for start in range(0, len(documents), docs_per_batch):
        group = documents[start : start + docs_per_batch]
        width = max(map(len, group))
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, document in enumerate(group):
            ids[i, : len(document)], mask[i, : len(document)] = torch.tensor(document), 1
        labels = ids.masked_fill(mask == 0, -100)
        padded.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    real = sum(lengths)
    computed = {"padded": sum(b["input_ids"].numel() for b in padded), "packed": len(packed_rows) * seq_len}
    providers = {"stock, padded": ("stock", padded), "stock, packed": ("stock", packed),
                 "patched, packed": ("patched", packed)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in providers}
    peaks: dict[str, float] = {}
    saved: dict[str, float] = {}
    for rep in range(reps + 1):
        for name, (mode, batches) in providers.items():
            if mode == "stock":
                lr2.unpatch(model)
            else:
                lr2.patch(model, table=table)
            with Heartbeat(f"{name}, round {rep}", model):
                if rep == 0:
                    with PeakMemory(device) as memory:
                        saved[name] = _step(model, batches, measure=True)
                    peaks[name] = memory.peak_mb
                    continue
                sync(device)
                start = time.perf_counter()
                _step(model, batches)
                sync(device)
                times[name].append(time.perf_counter() - start)
    lr2.unpatch(model)
    env = environment(device)
    baseline = statistics.median(times["stock, padded"])
    rows_out = []
    for name in providers:
        seconds = statistics.median(times[name])
        rows_out.append(dict(
            provider=name, seq_len=seq_len, documents=len(documents), real_tokens=real,
            computed_tokens=computed["padded" if "padded" in name else "packed"], ms=round(seconds * 1e3, 1),
            tokens_per_s=round(real / seconds, 1), saved_mb=round(saved[name], 1),
            peak_mb=round(peaks[name], 1) if device.type == "cuda" else "",
            speedup=round(baseline / seconds, 2), model=type(model).__name__,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."), **env,
        ))  # fmt: skip
    return rows_out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    parser.add_argument(
        "--config", default=None, help="a config.json: that model at random weights instead (default: --model)"
    )
    add_device_option(parser)
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row (default 2048)")
    parser.add_argument("--rows", type=int, default=2, help="packed rows: half long documents (default 2)")
    parser.add_argument("--docs-per-batch", type=int, default=4, help="documents per padded batch (default 4)")
    parser.add_argument("--reps", type=int, default=2, help="timed rounds after the warm-up (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the documents (default 0)")
    add_out_option(parser, fresh_results_folder(), "rows are appended to training.csv there")


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked before any model is built (a usage error exits with status 2); needs no GPU:
    benchmarks/gpu_check.py's dry run checks its commands with it."""
    parser = make_parser("bench_training", __doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.config is not None and not Path(args.config).is_file():
        parser.error(f"--config: expected a config.json file, got {args.config!r} (not a file)")
    for option in ("seq_len", "rows", "docs_per_batch", "reps"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')}: expected a positive integer, got {getattr(args, option)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = device_from(args.device)
    dtype = default_dtype(device)
    if args.config:
        model = random_model(args.config, device, dtype)
    else:
        model = load_model_quietly(args.model, device, torch.float32)[0].train()
    print(f"training benchmark: {type(model).__name__} on {device}, rows of {args.seq_len} tokens", flush=True)
    rows = run(model, device, args.seq_len, args.rows, args.docs_per_batch, args.reps, args.seed)
    show_and_append(rows, COLUMNS, Path(args.out) / "training.csv")
    return 0 if rows else 1
