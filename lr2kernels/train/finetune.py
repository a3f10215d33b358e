"""Mixed context window finetuning on Hugging Face ``Trainer``: packed short and long documents, each document with
its own table (LongRoPE2, arXiv 2502.20082, section "mixed context window training").

The model is patched (:func:`lr2kernels.patch`), so a packed row runs the fused varlen kernels with one table per
document, forward and backward: documents of at most L0 tokens keep the original RoPE (the short table) and adapt
nothing away from it, longer ones train the long table. ``Trainer`` does the rest: optimiser, schedule, gradient
accumulation and checkpointing, bf16, checkpoints and resume, and DDP / FSDP under ``torchrun`` or
``accelerate launch`` (gloo on CPUs, nccl on GPUs).

An output folder belongs to one job: ``finetune.json`` holds the job's fingerprint (the model's weights, the table,
the documents and every setting that changes the result); a rerun with the same job resumes from the last
checkpoint, a different job is refused, naming the first field that differs, and ``fresh=True`` moves the old folder
aside (nothing written is ever deleted). The result, ``<out>/model``, is a Hugging Face model folder whose
``config.json`` carries the table as ``longrope`` ``rope_parameters``: stock transformers loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lr2kernels.hf.models import weights_sha256
from lr2kernels.hf.patch import is_patched, patch, unpatch
from lr2kernels.hf.progress import Heartbeat
from lr2kernels.search.outputs import save_hf_config
from lr2kernels.tables import RopeTable
from lr2kernels.train.packing import PackedRow, collate, pack_documents

JOB_FILE = "finetune.json"
FINISHED_FILE = "finished.json"  # written once the model is exported: a rerun of the job then trains nothing
CHECKPOINTS = "checkpoints"
MODEL = "model"


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """Everything besides the model, table and documents that changes a finetune's result.

    Attributes:
        seq_len: tokens per packed row.
        long_fraction: fraction of rows that hold a long document (the paper's short:long mix).
        steps: optimiser steps.
        learning_rate: peak learning rate (linear warm-up over ``warmup_steps``, then linear decay).
        batch_size: rows per device and step; ``gradient_accumulation_steps`` multiplies it.
        gradient_checkpointing: recompute activations in backward (long rows in less memory).
        bf16: bf16 autocast (GPUs).
        save_steps: a checkpoint every this many steps (and at the end), the newest two kept, for a killed job to
            resume from; 0: none (a killed job starts over). Once the model is exported they are removed unless
            :func:`finetune` is told ``keep_checkpoints=True``.
        seed: data order, packing and initialisation of everything random.
        backend: the lr2kernels backend (None: the best available).
    """

    seq_len: int
    long_fraction: float = 0.5
    steps: int = 100
    learning_rate: float = 2e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    bf16: bool = False
    save_steps: int = 50
    seed: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        for name in ("seq_len", "steps", "batch_size", "gradient_accumulation_steps", "save_steps"):
            value = getattr(self, name)
            low = 0 if name == "save_steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                what = "an integer >= 0" if low == 0 else "a positive integer"
                raise ValueError(f"{name}: expected {what}, got {value!r}")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"long_fraction: expected a number in [0, 1], got {self.long_fraction!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: expected a positive number, got {self.learning_rate!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, weight_decay: expected non-negative numbers")


def documents_sha256(documents: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha256()
    for document in documents:
        digest.update(json.dumps([int(t) for t in document]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def job_fingerprint(model, table: RopeTable, documents, settings: FinetuneSettings) -> dict[str, Any]:
    """What makes two runs the same job (resumable from each other's checkpoints)."""
    return {
        "weights_sha256": weights_sha256(model),
        "model_type": model.config.model_type,
        "table": table.to_dict(),
        "documents_sha256": documents_sha256(documents),
        "documents": len(documents),
        **{f"settings.{k}": v for k, v in dataclasses.asdict(settings).items()},
    }


def move_aside(folder: Path) -> Path:
    """``folder`` -> ``folder.old-<YYYYmmdd-HHMMSS>[-n]`` (a fresh start that deletes nothing). Returns the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 10_000):
        backup = folder.with_name(f"{folder.name}.old-{stamp}" + (f"-{attempt}" if attempt > 1 else ""))
        if not backup.exists():
            folder.rename(backup)
            return backup
    raise FileExistsError(f"out: no free name to move {folder} aside")


def claim_output_folder(out: Path, fingerprint: dict[str, Any], fresh: bool) -> None:
    """Make ``out`` this job's folder: new, the same job's (resume), or refused (another job's, unless ``fresh``)."""
    job_file = out / JOB_FILE
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: expected a folder, got the file {out}")
    if out.exists() and any(out.iterdir()):
        if fresh:
            print(f"finetune: moved the previous run aside to {move_aside(out)}", flush=True)
        elif not job_file.is_file():
            raise ValueError(f"out: {out} holds files that are not a finetune's ({JOB_FILE} missing); pick an empty "
                             "folder or pass fresh=True / --fresh to move it aside")  # fmt: skip
        else:
            try:
                logged = json.loads(job_file.read_text())
            except (OSError, json.JSONDecodeError) as error:
                message = f"out: {job_file} is unreadable ({error}); pass --fresh to move the run aside"
                raise ValueError(message) from None
            for key in sorted(set(logged) | set(fingerprint)):
                if logged.get(key) != fingerprint.get(key):
                    raise ValueError(
                        f"out: {out} holds a finetune of another job: {key} was {_short(logged.get(key))}, is now "
                        f"{_short(fingerprint.get(key))}; pass --fresh to move it aside, or another --out"
                    )
            return
    out.mkdir(parents=True, exist_ok=True)
    job_file.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class PackedRows(torch.utils.data.Dataset):
    def __init__(self, rows: list[PackedRow]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PackedRow:
        return self.rows[index]


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not folder.is_dir():
        return None
    last = get_last_checkpoint(str(folder))
    if last is not None and not (Path(last) / "trainer_state.json").is_file():
        raise ValueError(f"checkpoint: {last} is incomplete (no trainer_state.json); move it aside and rerun")
    return last


def _finished_steps(checkpoint: str) -> int:
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("global_step", 0))


def _load_checkpoint_weights(model: torch.nn.Module, checkpoint: str) -> None:
    """The checkpoint's weights into ``model`` (through from_pretrained: tied weights and shards handled)."""
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict())


def finetune(
    model: torch.nn.Module,
    tokenizer: Any,
    table: RopeTable,
    documents: Sequence[Sequence[int]],
    settings: FinetuneSettings,
    out: str | os.PathLike,
    *,
    fresh: bool = False,
    progress: bool = True,
    fsdp: bool = False,
    keep_checkpoints: bool = False,
) -> Path:
    """Finetune ``model`` on packed ``documents`` with ``table``; returns ``<out>/model`` (a HF model folder).

    Args:
        model: a transformers causal LM :func:`lr2kernels.patch` supports; trained in place (and left unpatched).
        tokenizer: saved next to the model (None: not saved).
        table: the LongRoPE table (e.g. ``lr2kernels search``'s result); its head_dim must be the model's.
        documents: token id lists; packed by :func:`lr2kernels.train.pack_documents` with ``table``'s L0.
        settings: the :class:`FinetuneSettings`.
        out: the job's folder: ``finetune.json``, ``checkpoints/``, ``model/``. Rerunning the same job resumes.
        fresh: move a previous run in ``out`` aside first.
        progress: Trainer's progress bar and a log line every few steps.
        fsdp: under torchrun / accelerate with more than one process on GPUs, shard parameters, gradients and
            optimiser state with FSDP2 (one shard group per decoder layer, nccl) instead of DDP's full replicas.
            The result is the same job (same global batch, same weights up to rounding), so it is not part of the
            job's fingerprint; a single process ignores it. accelerate runs FSDP on accelerators only: on the CPU
            it is refused (not silently replaced by DDP).
        keep_checkpoints: keep ``<out>/checkpoints`` once the model is exported. By default they are removed then:
            they exist to resume a killed job, and each holds the weights and twice their size in optimiser state
            (2.1 GB for SmolLM2-135M). A rerun of a finished job trains nothing either way.

    Prints a warning (stderr) before training when no packed row holds a document longer than L0: then only the
    short table (the original RoPE) is trained on, and the long factors are never used.
    """
    from transformers import Trainer, TrainingArguments

    out = Path(out)
    if not isinstance(table, RopeTable):
        raise TypeError(f"table: expected a lr2kernels.RopeTable, got {type(table).__name__}")
    if fsdp and next(model.parameters()).device.type == "cpu":
        raise ValueError(
            "fsdp: accelerate shards models with FSDP on GPUs only; on the CPU leave it out (several processes then "
            "train with DDP over gloo)"
        )
    if getattr(model, "is_quantized", False):
        method = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
        raise ValueError(
            f"model: expected a model with plain weights to finetune in full, got one quantized "
            f"({getattr(method, 'quant_method', 'unknown method')}); for a GGUF file load it dequantized "
            f"(lr2kernels.hf.models.load_model does: quantization_config=GgufConfig(dequantize=True))"
        )
    rows = pack_documents(
        documents, seq_len=settings.seq_len, original_length=table.original_max_position,
        long_fraction=settings.long_fraction, pad_token_id=_pad_id(model, tokenizer), seed=settings.seed,
    )  # fmt: skip
    patch(model, backend=settings.backend, table=table)  # validates the table against the model, first
    fingerprint = job_fingerprint(model, table, documents, settings)
    claim_output_folder(out, fingerprint, fresh)
    if (out / FINISHED_FILE).is_file() and (out / MODEL / "config.json").is_file():
        unpatch(model)
        if progress:
            print(f"finetune: this job finished before; its model is in {out / MODEL} (nothing trained)", flush=True)
        _load_checkpoint_weights(model, str(out / MODEL))
        if not keep_checkpoints and int(os.environ.get("RANK", "0")) == 0:  # one process removes them
            _remove_checkpoints(out)
        return out / MODEL
    if not any(row.long for row in rows):
        longest = max((len(d) for d in documents), default=0)
        print(f"finetune: WARNING: no row holds a long document (longest document {longest} tokens, L0 "
              f"{table.original_max_position}, rows of {settings.seq_len} tokens, long_fraction "
              f"{settings.long_fraction}): only the short table (the original RoPE) is trained on; the table's long "
              "factors are never used. Add documents longer than L0, with rows long enough to hold them.",
              file=sys.stderr, flush=True)  # fmt: skip
    resume = _last_checkpoint(out / CHECKPOINTS)
    model.train()
    sharded = fsdp and _distributed()
    recompute = settings.gradient_checkpointing
    arguments = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="linear",
        # Under FSDP, its own per-layer recompute (the Trainer's would all-gather every layer once more).
        activation_checkpointing=recompute and not sharded,
        activation_checkpointing_kwargs={"use_reentrant": False} if recompute and not sharded else None,
        fsdp=sharded or None,
        fsdp_config={"version": 2, "activation_checkpointing": recompute} if sharded else None,
        bf16=settings.bf16,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or None,
        # The newest two: a kill while the newest is written leaves the one before it to resume from, and a long
        # run does not fill the disk (each checkpoint holds the weights and twice their size in optimiser state).
        save_total_limit=2,
        logging_steps=max(1, min(10, settings.steps // 10)),
        seed=settings.seed,
        data_seed=settings.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
        use_cpu=next(model.parameters()).device.type == "cpu",
        ddp_backend="gloo" if _distributed() and not torch.cuda.is_available() else None,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=PackedRows(rows), data_collator=collate)
    if resume is not None and _finished_steps(resume) >= settings.steps:
        # The job had finished (killed before or after its export): Trainer would run one more step from a final
        # checkpoint, so its weights are taken as they are and exported again.
        if progress:
            print(f"finetune: all {settings.steps} steps done in {resume}; exporting its weights", flush=True)
        _load_checkpoint_weights(model, resume)
        unpatch(model)
        return _finish(model, tokenizer, table, out, trainer, settings.steps, keep_checkpoints, progress)
    if progress:
        long_rows = sum(row.long for row in rows)
        print(f"finetune: {len(rows)} rows of {settings.seq_len} tokens ({long_rows} with a long document), "
              f"{settings.steps} steps" + (f", resuming from {resume}" if resume else ""), flush=True)  # fmt: skip
    # Trainer's bar moves once per step, and a step of 16K tokens on a CPU takes minutes: a line every 30 s between.
    beat = Heartbeat("training step", model, every=30.0, indent="  ") if progress else contextlib.nullcontext()
    try:
        with beat:
            trainer.train(resume_from_checkpoint=resume)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        if resume is None:
            raise
        raise ValueError(f"checkpoint: resuming from {resume} failed ({error}); move it aside and rerun") from error
    unpatch(model)
    return _finish(model, tokenizer, table, out, trainer, settings.steps, keep_checkpoints, progress)


def _finish(
    model, tokenizer, table: RopeTable, out: Path, trainer, steps: int, keep_checkpoints: bool, progress: bool
) -> Path:
    """Export the model, mark the job finished, then (unless kept) remove its checkpoints: a kill at any point
    leaves either the checkpoints to export again from or the finished model."""
    folder = export(model, tokenizer, table, out / MODEL, trainer)
    if trainer.is_world_process_zero():
        (out / FINISHED_FILE).write_text(json.dumps({"steps": steps, "model": MODEL}) + "\n")
        if not keep_checkpoints:
            removed = _remove_checkpoints(out)
            if removed and progress:
                print(f"finetune: removed the job's checkpoints ({removed / 2**20:.0f} MB) now that the model is "
                      "exported (keep_checkpoints / --keep-checkpoints keeps them)", flush=True)  # fmt: skip
    return folder


def _remove_checkpoints(out: Path) -> int:
    """``<out>/checkpoints``, written by this job to resume it, once its model is exported. Returns the bytes freed."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return 0
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    shutil.rmtree(folder)
    return size


def export(model, tokenizer, table: RopeTable, folder: Path, trainer=None) -> Path:
    """Save ``model`` (unpatched) as a HF model folder whose ``config.json`` carries ``table`` (longrope)."""
    if is_patched(model):
        raise ValueError("model: expected an unpatched model to export (call lr2kernels.unpatch first)")
    if trainer is not None and not trainer.is_world_process_zero():
        return folder
    model.save_pretrained(folder)
    save_hf_config(folder, model.config, table)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _distributed() -> bool:
    """Launched by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _pad_id(model, tokenizer) -> int:
    for source in (tokenizer, getattr(model, "config", None)):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return 0
