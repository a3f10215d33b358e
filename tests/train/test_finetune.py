"""lr2kernels.train.finetune on a tiny LongRoPE llama (L0 = 32): Trainer, resume, export, the job's folder."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch
import transformers

import lr2kernels as lr2
from lr2kernels.train.finetune import FINISHED_FILE, FinetuneSettings, export, finetune
from tests.models import L0, tiny_model

SETTINGS = FinetuneSettings(seq_len=64, long_fraction=0.5, steps=6, learning_rate=1e-3, batch_size=2, save_steps=3)


def documents(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    short = [[rng.randrange(3, 101) for _ in range(rng.randrange(5, L0 + 1))] for _ in range(24)]
    long = [[rng.randrange(3, 101) for _ in range(rng.randrange(L0 + 1, 65))] for _ in range(8)]
    return short + long


def model_and_table():
    model = tiny_model("llama")
    return model, lr2.RopeTable.from_hf_config(model.config)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_finetune_trains_and_exports_a_folder_stock_transformers_loads(tmp_path, capsys):
    model, table = model_and_table()
    before = weights(model)
    folder = finetune(model, None, table, documents(), SETTINGS, tmp_path / "run", progress=False)
    assert "no row holds a long document" not in capsys.readouterr().err
    # Done: the model is exported, the job marked finished, and its checkpoints (kept to resume a kill) are gone.
    assert (tmp_path / "run" / FINISHED_FILE).is_file() and not (tmp_path / "run" / "checkpoints").exists()
    assert not lr2.hf.is_patched(model)
    assert any(not torch.equal(before[name], tensor) for name, tensor in weights(model).items())  # it trained
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "longrope"
    assert config["rope_parameters"]["long_factor"] == list(table.long_factor)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    lr2.patch(model, table=table)
    model.eval()
    for length in (L0 - 4, 2 * L0):  # both tables
        ids = torch.randint(3, 101, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_rerun_after_a_kill_resumes_and_ends_where_an_uninterrupted_run_does(tmp_path, monkeypatch):
    model, table = model_and_table()
    finetune(model, None, table, documents(), SETTINGS, tmp_path / "whole", progress=False)
    uninterrupted = weights(model)

    class Killed(Exception):
        pass

    original_step = transformers.Trainer.training_step

    def step_then_die(self, *args, **kwargs):
        if self.state.global_step == 4:  # after the checkpoint at step 3
            raise Killed
        return original_step(self, *args, **kwargs)

    killed, table = model_and_table()
    monkeypatch.setattr(transformers.Trainer, "training_step", step_then_die)
    with pytest.raises(Killed):
        finetune(killed, None, table, documents(), SETTINGS, tmp_path / "killed", progress=False)
    monkeypatch.undo()
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint-3").is_dir()
    rerun, table = model_and_table()  # the same command again: a fresh process loads the same model
    finetune(rerun, None, table, documents(), SETTINGS, tmp_path / "killed", progress=False)
    for name, tensor in weights(rerun).items():
        torch.testing.assert_close(tensor, uninterrupted[name], atol=1e-6, rtol=1e-5, msg=name)


def test_another_job_in_the_folder_is_refused_and_fresh_moves_it_aside(tmp_path):
    model, table = model_and_table()
    out = tmp_path / "run"
    finetune(model, None, table, documents(), SETTINGS, out, progress=False)
    other = FinetuneSettings(**{**SETTINGS.__dict__, "long_fraction": 0.25})
    with pytest.raises(ValueError, match=r"another job: settings.long_fraction was 0.5, is now 0.25"):
        finetune(tiny_model("llama"), None, table, documents(), other, out, progress=False)
    with pytest.raises(ValueError, match=r"another job: documents"):
        finetune(tiny_model("llama"), None, table, documents(seed=1), SETTINGS, out, progress=False)
    finetune(tiny_model("llama"), None, table, documents(), other, out, fresh=True, progress=False)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(kept) == 1 and (kept[0] / "model" / "config.json").is_file()  # nothing deleted


def test_a_folder_of_other_files_and_a_corrupt_checkpoint_are_named(tmp_path):
    model, table = model_and_table()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"out: .*mine holds files that are not a finetune's"):
        finetune(model, None, table, documents(), SETTINGS, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    out = tmp_path / "run"
    finetune(model, None, table, documents(), SETTINGS, out, progress=False, keep_checkpoints=True)
    (out / FINISHED_FILE).unlink()  # as if killed after the last checkpoint, before the job was marked finished
    (out / "checkpoints" / "checkpoint-6" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"checkpoint: .*checkpoint-6 is incomplete"):
        finetune(tiny_model("llama"), None, table, documents(), SETTINGS, out, progress=False)


def test_bad_settings_and_tables_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"seq_len: expected a positive integer, got 0"):
        FinetuneSettings(seq_len=0)
    with pytest.raises(ValueError, match=r"long_fraction: expected a number in \[0, 1\], got 1.5"):
        FinetuneSettings(seq_len=8, long_fraction=1.5)
    model, table = model_and_table()
    other = lr2.RopeTable.longrope(
        head_dim=32, base=10000.0, original_max_position=L0, max_position=8 * L0,
        short_factor=[1.0] * 16, long_factor=[2.0] * 16,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"table.rotary_dim: expected the model's rotary width 16 .*got 32"):
        finetune(model, None, other, documents(), SETTINGS, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the folder was claimed
    with pytest.raises(ValueError, match=r"documents"):
        finetune(model, None, table, [], SETTINGS, tmp_path / "run2", progress=False)
    with pytest.raises(ValueError, match=r"model: expected an unpatched model"):
        export(lr2.patch(tiny_model("llama")), None, table, tmp_path / "x")


# ---- the command line --------------------------------------------------------------------------------------------


def tiny_model_folder(folder) -> None:
    """A tiny LongRoPE llama with a word-level tokenizer, saved as a HF model folder (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(ENGLISH.split()))[:98]
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    model = tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


ENGLISH = (
    "the model reads long documents and short ones packed together so that each keeps its own table while the "
    "short documents keep what the model knew and the long ones teach it the rescaled positions past the original "
    "window of training which is what the paper calls mixed context window training on rows of one length"
)


def write_data(path, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ENGLISH.split()
    lines = []
    for length in [rng.randrange(5, L0) for _ in range(20)] + [rng.randrange(L0 + 1, 64) for _ in range(6)]:
        lines.append(json.dumps({"text": " ".join(rng.choice(words) for _ in range(length))}))
    path.write_text("\n".join(lines) + "\n")


CLI_OPTIONS = ["--seq-len", "64", "--steps", "4", "--save-steps", "2", "--lr", "1e-3", "--device", "cpu"]


def test_cli_finetunes_a_local_model_folder(tmp_path, capsys):
    from lr2kernels.apps.cli import main

    tiny_model_folder(tmp_path / "tiny")
    lr2.RopeTable.from_hf_config(transformers.AutoConfig.from_pretrained(tmp_path / "tiny")).save(tmp_path / "t.json")
    write_data(tmp_path / "docs.jsonl")
    argv = ["finetune", "--model", str(tmp_path / "tiny"), "--table", str(tmp_path / "t.json"),
            "--data", str(tmp_path / "docs.jsonl"), *CLI_OPTIONS, "--batch-size", "2",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "with a long document" in out and "stock transformers" in out
    assert re.search(r"removed the job's checkpoints \(\d+ MB\) now that the model is exported", out)
    assert not (tmp_path / "out" / "checkpoints").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert loaded.config.rope_parameters["rope_type"] == "longrope"
    assert (tmp_path / "out" / "model" / "tokenizer.json").is_file()


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    # torchrun, 2 CPU processes (gloo, DDP), 1 row each per step == 1 process, 2 rows per step.
    tiny_model_folder(tmp_path / "tiny")
    lr2.RopeTable.from_hf_config(transformers.AutoConfig.from_pretrained(tmp_path / "tiny")).save(tmp_path / "t.json")
    write_data(tmp_path / "docs.jsonl")
    common = ["-m", "lr2kernels", "finetune", "--model", str(tmp_path / "tiny"), "--table", str(tmp_path / "t.json"),
              "--data", str(tmp_path / "docs.jsonl"), *CLI_OPTIONS]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    runs = {
        "one": [sys.executable, *common, "--batch-size", "2", "--out", str(tmp_path / "one")],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + os.getpid() % 1000), *common, "--batch-size", "1", "--out", str(tmp_path / "two")],
    }  # fmt: skip
    for name, command in runs.items():
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert result.returncode == 0, (name, result.stdout[-2000:], result.stderr[-4000:])
    one = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model").state_dict()
    two = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model").state_dict()
    initial = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").state_dict()
    assert any(not torch.equal(one[name], initial[name]) for name in one)
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_checkpointing_gives_the_same_training_step(tmp_path):
    plain, table = model_and_table()
    checkpointed, _ = model_and_table()
    settings = FinetuneSettings(**{**SETTINGS.__dict__, "steps": 2, "save_steps": 2})
    finetune(plain, None, table, documents(), settings, tmp_path / "plain", progress=False)
    recomputed = FinetuneSettings(**{**settings.__dict__, "gradient_checkpointing": True})
    finetune(checkpointed, None, table, documents(), recomputed, tmp_path / "checkpointed", progress=False)
    for (name, want), got in zip(plain.state_dict().items(), checkpointed.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow  # loads the real model
def test_the_embedded_gguf_model_finetunes_and_exports(tmp_path):
    """The default model of ``lr2kernels finetune`` (SmolLM2 from its GGUF file) loads as plain weights: Trainer
    trains it and save_pretrained writes it (transformers marks a GGUF model as quantized unless it is loaded
    dequantized, and then refuses both)."""
    from lr2kernels.hf.models import load_model, small_l0_table

    model, tokenizer = load_model("smollm2")
    assert not getattr(model, "is_quantized", False)
    table = small_l0_table(model.config, 32)
    rng = random.Random(0)
    docs = [[rng.randrange(3, 40000) for _ in range(rng.randrange(8, 33))] for _ in range(6)]
    docs += [[rng.randrange(3, 40000) for _ in range(60)]]
    settings = FinetuneSettings(seq_len=64, steps=1, learning_rate=1e-5, save_steps=1)
    folder = finetune(model, tokenizer, table, docs, settings, tmp_path / "run", progress=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ids = torch.tensor([docs[-1]])
    lr2.patch(model, table=table)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_quantized_model_is_refused_by_name(tmp_path):
    model, table = model_and_table()
    model.is_quantized = True
    with pytest.raises(ValueError, match="model: expected a model with plain weights"):
        finetune(model, None, table, documents(), SETTINGS, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing written


def test_fsdp_on_the_cpu_is_refused_not_replaced_by_ddp(tmp_path):
    """accelerate shards with FSDP only on accelerators; asked for on the CPU it would quietly train with DDP."""
    model, table = model_and_table()
    with pytest.raises(ValueError, match="fsdp: accelerate shards models with FSDP on GPUs only"):
        finetune(model, None, table, documents(), SETTINGS, tmp_path / "run", progress=False, fsdp=True)
    assert not (tmp_path / "run").exists()  # the command line's --fsdp on the CPU: tests/test_cli.py


@pytest.mark.parametrize("killed", [False, True], ids=["finished", "killed-before-marked-finished"])
def test_rerunning_a_finished_job_trains_no_further_step(tmp_path, monkeypatch, killed):
    """Trainer resumed from a job's final checkpoint runs one step past it (transformers 5.24); a finished job rerun
    (killed during or after its export, say) must export the final checkpoint's weights unchanged; a job marked
    finished (its checkpoints removed) loads its exported model and trains nothing."""
    model, table = model_and_table()
    settings = FinetuneSettings(**{**SETTINGS.__dict__, "steps": 3, "save_steps": 1})
    finetune(model, None, table, documents(), settings, tmp_path / "run", progress=False, keep_checkpoints=killed)
    if killed:
        (tmp_path / "run" / FINISHED_FILE).unlink()
        (tmp_path / "run" / "model" / "model.safetensors").unlink()  # killed while the export was written
    finished = weights(model)
    rerun, _ = model_and_table()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished job trained again")

    monkeypatch.setattr(transformers.Trainer, "training_step", no_training)
    folder = finetune(rerun, None, table, documents(), settings, tmp_path / "run", progress=False)
    for name, tensor in weights(rerun).items():
        torch.testing.assert_close(tensor, finished[name], atol=0, rtol=0, msg=name)
    exported = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, finished[name], atol=0, rtol=0, msg=name)


def test_documents_none_longer_than_l0_warn_once_before_training(tmp_path, capsys):
    """Only short documents: every row holds short ones, the long factors are never used: said once, up front."""
    model, table = model_and_table()
    short = [document for document in documents() if len(document) <= L0]
    settings = FinetuneSettings(**{**SETTINGS.__dict__, "steps": 1, "save_steps": 0})
    finetune(model, None, table, short, settings, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert err.count("no row holds a long document") == 1
    assert f"L0 {L0}" in err and "only the short table" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # save_steps 0: none written, not even at the end


def test_keep_checkpoints_keeps_them(tmp_path):
    model, table = model_and_table()
    settings = FinetuneSettings(**{**SETTINGS.__dict__, "steps": 2, "save_steps": 1})
    finetune(model, None, table, documents(), settings, tmp_path / "run", progress=False, keep_checkpoints=True)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(ValueError, match=r"save_steps: expected an integer >= 0, got -1"):
        FinetuneSettings(seq_len=8, save_steps=-1)
