"""``lr2kernels demo``: a real model, stock transformers vs ``lr2kernels.patch``, every claim measured and checked.

Four steps, on the embedded SmolLM2-135M by default (fp32):
1. logits: the patched model's logits equal the stock model's on real English text;
2. speed: prefill and decode tokens/s, stock vs patched, on the same input (warmed up, alternating, median);
3. passkey: a needle-in-a-haystack prompt at the longest length the device allows, answered by the patched model;
4. the L0 boundary: a LongRoPE table with a small L0 (96). Stock transformers, running its own ``longrope`` code,
   either drifts from a full forward when it keeps its cache across L0, or re-runs the whole sequence (Phi3's
   generate); the patched model (``rule="position"``) takes one cached step that equals the full forward.

Exit code 0 iff every check passes; 1 if one fails; 2 if the model cannot be loaded (with the install command).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import random
import re
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

import lr2kernels as lr2
from lr2kernels.hf.models import small_l0_table
from lr2kernels.search.needle import PASSKEY_FILLER

TEXT = Path(__file__).resolve().parent / "data" / "english_text.txt"

LOGIT_TOLERANCE = 1e-3  # fp32, 30 layers: patched vs stock on real text
BOUNDARY_TOLERANCE = 2e-4  # fp32, 30 layers: incremental step vs full forward past L0

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_NEW_TOKENS = 6

BOUNDARY_L0 = 96  # small enough for a CPU run to cross (SmolLM2 itself has 8192 positions)
BOUNDARY_PREFILL, BOUNDARY_END = 88, 112  # decode positions 88..111: 8 short, 16 long


# ---------------------------------------------------------------------------------------------------- plumbing
class Progress:
    """Numbered steps with their wall time; every line flushed as it is printed."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.start, self.step_start = total, 0, time.perf_counter(), 0.0

    def step(self, title: str) -> None:
        self.index += 1
        self.step_start = time.perf_counter()
        print(f"\n[{self.index}/{self.total}] {title}", flush=True)

    def done(self) -> None:
        print(f"      ({time.perf_counter() - self.step_start:.1f} s)", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _say(line: str) -> None:
    print(f"      {line}", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _patched(model, **kwargs) -> Iterator[None]:
    lr2.patch(model, **kwargs)
    try:
        yield
    finally:
        lr2.unpatch(model)


class TokenCounter:
    """Counts the tokens that go through the model (a hook on its input embedding)."""

    def __init__(self, model) -> None:
        self.tokens = 0
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.tokens += inputs[0].numel()

    def close(self) -> None:
        self._handle.remove()


def _text_ids(tokenizer, length: int, device: torch.device) -> torch.Tensor:
    ids = tokenizer(TEXT.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    if ids.numel() < length:
        ids = ids.repeat(length // ids.numel() + 1)
    return ids[:length][None].to(device)


def _cache_of(out):
    """The KV cache of a model output (``cache`` in transformers >= 5.24, ``past_key_values`` before)."""
    names = {field.name for field in dataclasses.fields(out)}
    return out.cache if "cache" in names else out.past_key_values


def _last_logits(model, ids: torch.Tensor, cache=None, use_cache: bool = False):
    """One forward; logits of the last position only (a 4K-token prompt's full logits would take 0.8 GB)."""
    out = model(ids, cache=cache, use_cache=use_cache or cache is not None, logits_to_keep=1)
    return out.logits[:, -1].float(), _cache_of(out)


# ---------------------------------------------------------------------------------------------------- 1. logits
def check_logits(model, tokenizer, device: torch.device, length: int) -> float:
    ids = _text_ids(tokenizer, length, device)
    with torch.no_grad():
        stock = model(ids).logits.float()
        with _patched(model):
            patched = model(ids).logits.float()
        loss = torch.nn.functional.cross_entropy(stock[0, :-1], ids[0, 1:]).item()
    difference = (patched - stock).abs().max().item()
    _say(f"{ids.shape[1]} tokens of {TEXT.name}; stock model loss {loss:.3f}")
    _say(f"max |patched - stock| logit = {difference:.3e}   (tolerance {LOGIT_TOLERANCE:.0e})")
    return difference


# ---------------------------------------------------------------------------------------------------- 2. speed
def _prefill_and_decode(model, ids: torch.Tensor, steps: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds for ``steps`` greedy cached steps, the greedy tokens)."""
    device = ids.device
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        prefill = time.perf_counter() - start
        cache, tokens = _cache_of(out), [int(token)]
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, cache=cache, use_cache=True)
            cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
        _sync(device)
        decode = time.perf_counter() - start
    return prefill, decode, tokens


def compare_speed(model, tokenizer, device: torch.device, length: int, steps: int, reps: int) -> dict:
    ids = _text_ids(tokenizer, length, device)
    times: dict[str, dict[str, list[float]]] = {p: {"prefill": [], "decode": []} for p in ("stock", "patched")}
    tokens: dict[str, list[int]] = {}
    for rep in range(reps + 1):  # round 0 warms both up and is not counted
        order = ("stock", "patched") if rep % 2 else ("patched", "stock")  # alternate who goes first
        for provider in order:
            context = _patched(model) if provider == "patched" else contextlib.nullcontext()
            with context:
                prefill, decode, tokens[provider] = _prefill_and_decode(model, ids, steps)
            if rep:
                times[provider]["prefill"].append(prefill)
                times[provider]["decode"].append(decode)
    rate = {
        p: {"prefill": length / statistics.median(t["prefill"]), "decode": steps / statistics.median(t["decode"])}
        for p, t in times.items()
    }
    _say(f"same input for both: {length} tokens of text, then {steps} greedy cached steps; 1 warm-up round, then")
    _say(f"{reps} rounds alternating which model goes first; median tokens/s (higher is better)")
    _say("")
    _say(f"{'':<10}{'stock HF (SDPA)':>17}{'lr2 patched':>14}{'patched/stock':>15}")
    for mode in ("prefill", "decode"):
        stock, patched = rate["stock"][mode], rate["patched"][mode]
        _say(f"{mode:<10}{stock:>17.1f}{patched:>14.1f}{patched / stock:>14.2f}x")
    same = tokens["stock"] == tokens["patched"]
    _say("")
    _say(f"greedy tokens identical (stock vs patched, {steps + 1} tokens): {'yes' if same else 'no'}")
    return rate


# ---------------------------------------------------------------------------------------------------- 3. passkey
def passkey_prompt(tokenizer, length: int, key: int, depth: float = 0.5) -> torch.Tensor:
    """The classic passkey prompt, about ``length`` tokens, the needle at ``depth`` of the filler."""

    def build(repeats: int) -> list[int]:
        before = round(repeats * depth)
        text = (
            PASSKEY_INTRO
            + PASSKEY_FILLER * before
            + PASSKEY_NEEDLE.format(key=key)
            + PASSKEY_FILLER * (repeats - before)
            + PASSKEY_QUESTION
        )
        return tokenizer(text).input_ids

    per_repeat = len(tokenizer(PASSKEY_FILLER * 10).input_ids) / 10
    fixed = len(build(0))
    repeats = max(1, round((length - fixed) / per_repeat))
    ids = build(repeats)
    while len(ids) > length and repeats > 1:  # never longer than asked
        repeats -= 1
        ids = build(repeats)
    return torch.tensor([ids])


def check_passkey(model, tokenizer, device: torch.device, length: int, seed: int) -> tuple[bool, int]:
    key = random.Random(seed).randint(10000, 99999)
    ids = passkey_prompt(tokenizer, length, key).to(device)
    _say(f"prompt: {ids.shape[1]} tokens (filler + needle at 50% depth), key {key} (random, seed {seed})")
    with torch.no_grad(), _patched(model):
        _sync(device)
        start = time.perf_counter()
        logits, cache = _last_logits(model, ids, use_cache=True)
        answer = [int(logits.argmax(-1))]
        for _ in range(PASSKEY_NEW_TOKENS - 1):
            logits, cache = _last_logits(model, torch.tensor([[answer[-1]]], device=device), cache)
            answer.append(int(logits.argmax(-1)))
        _sync(device)
        seconds = time.perf_counter() - start
    text = tokenizer.decode(answer)
    passed = str(key) in text
    _say(f"patched model, greedy {PASSKEY_NEW_TOKENS} tokens: {text!r}   ({seconds:.1f} s)")
    _say(f"passkey at {ids.shape[1]} tokens: {'PASS' if passed else 'FAIL'}")
    return passed, int(ids.shape[1])


# ---------------------------------------------------------------------------------------------------- 4. boundary
@contextlib.contextmanager
def stock_with_table(model, table: lr2.RopeTable) -> Iterator[list[torch.nn.Module]]:
    """The STOCK model running ``table`` through transformers' own ``longrope`` code.

    A copy of the config gets ``table.to_hf_rope_parameters()`` (and ``max_position_embeddings``); each rotary
    module is rebuilt from it by its own class, exactly as ``from_pretrained`` would build it for that config, so
    its ``inv_freq`` and the short/long switch are transformers'. The weights are untouched; the original rotary
    modules come back on exit.
    """
    config = copy.deepcopy(model.config)
    config.rope_parameters = table.to_hf_rope_parameters()
    config.max_position_embeddings = table.max_position
    if getattr(config, "original_max_position_embeddings", None) is not None:  # Phi3 style: L0 at top level too
        config.original_max_position_embeddings = table.original_max_position
    names = [name for name, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]
    originals = [model.get_submodule(name) for name in names]
    device = next(model.parameters()).device
    rebuilt = [type(m)(config).to(device) for m in originals]
    for name, module in zip(names, rebuilt):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)
    try:
        yield rebuilt
    finally:
        for name, module in zip(names, originals):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, module)


def _timed_logits(model, ids: torch.Tensor, counter: TokenCounter, cache=None) -> tuple[torch.Tensor, int, float]:
    """(last logits, tokens run through the model, seconds) of one forward."""
    counter.tokens = 0
    _sync(ids.device)
    start = time.perf_counter()
    logits, _ = _last_logits(model, ids, cache)
    _sync(ids.device)
    return logits, counter.tokens, time.perf_counter() - start


def _incremental_vs_full(model, ids: torch.Tensor, prefill: int, l0: int) -> dict:
    """Decode ``ids[prefill:]`` one cached step at a time; compare each step's logits with a full forward.

    Returns the worst difference before and past L0 (``short``, ``long``) and, for the first token past L0
    (sequence length L0 + 1), two ways to get its logits as (tokens run, seconds, |logits - full forward|):
    ``step``, one cached step, and ``reprefill``, the whole sequence again without a cache (Phi3's generate).
    """
    counter = TokenCounter(model)
    result: dict = {"short": 0.0, "long": 0.0}
    try:
        with torch.no_grad():
            _, cache = _last_logits(model, ids[:, :prefill], use_cache=True)
            for t in range(prefill, ids.shape[1]):
                full, _ = _last_logits(model, ids[:, : t + 1])
                if t == l0:  # the first token past L0: one cached step (on a copy of the cache), or a re-prefill
                    logits, tokens, seconds = _timed_logits(model, ids[:, t : t + 1], counter, copy.deepcopy(cache))
                    result["step"] = (tokens, seconds, (logits - full).abs().max().item())
                    logits, tokens, seconds = _timed_logits(model, ids[:, : t + 1], counter)
                    result["reprefill"] = (tokens, seconds, (logits - full).abs().max().item())
                step, cache = _last_logits(model, ids[:, t : t + 1], cache)
                side = "long" if t + 1 > l0 else "short"
                result[side] = max(result[side], (step - full).abs().max().item())
    finally:
        counter.close()
    return result


def check_boundary(model, tokenizer, device: torch.device) -> dict:
    table = small_l0_table(model.config, BOUNDARY_L0)
    ids = _text_ids(tokenizer, BOUNDARY_END, device)
    l0 = table.original_max_position
    _say(
        f"LongRoPE table: L0 = {l0}, max {table.max_position}; short factors 1; long factors YaRN-shaped "
        f"{table.long_factor[0]:.2f}..{table.long_factor[-1]:.2f}; attention factor {table.attention_factor:.4f}"
    )
    _say(
        f"prefill {BOUNDARY_PREFILL} tokens of text, decode positions {BOUNDARY_PREFILL}..{BOUNDARY_END - 1} one "
        "cached step at a time; each step vs a full forward"
    )
    with torch.no_grad():
        with stock_with_table(model, table) as rotary:
            stock = _incremental_vs_full(model, ids, BOUNDARY_PREFILL, l0)
            switched = torch.equal(rotary[0].inv_freq.cpu(), table.inv_freq(long=True))  # after a long forward
            stock_full, _ = _last_logits(model, ids)
        with _patched(model, table=table, rule="hf"):
            hf_rule = _incremental_vs_full(model, ids, BOUNDARY_PREFILL, l0)
            patched_full, _ = _last_logits(model, ids)
        with _patched(model, table=table, rule="position"):
            position = _incremental_vs_full(model, ids, BOUNDARY_PREFILL, l0)
    same_table = (stock_full - patched_full).abs().max().item()
    _say(
        f"stock HF: {type(rotary[0]).__name__} rebuilt from a config with rope_parameters = "
        "table.to_hf_rope_parameters()"
    )
    _say(
        f"  (rope_type {rotary[0].rope_type!r}: transformers' own code); past L0 its inv_freq is "
        f"{'the' if switched else 'NOT the'} table's long one"
    )
    _say(
        f"same table: full forward over {BOUNDARY_END} tokens, stock vs patched (rule=hf): max |diff| = "
        f"{same_table:.3e}"
    )
    _say("")
    _say("max |incremental step - full forward| logit over the decoded steps:")
    _say(f"  {'':<42}{'before L0':>11}{'past L0':>11}")
    rows = [
        ("stock HF longrope, cache kept", stock),
        ("patched rule=hf (one table per seq)", hf_rule),
        ("patched rule=position", position),
    ]
    for name, r in rows:
        _say(f"  {name:<42}{r['short']:>11.3e}{r['long']:>11.3e}")
    _say("")
    _say(f"the first token past L0 (position {l0}, sequence length {l0 + 1}):")
    _say(f"  {'':<42}{'tokens run':>11}{'ms':>9}{'|vs full|':>11}")
    rows = [
        ("stock, cache kept (Llama-style generate)", stock["step"]),
        ("stock, re-prefill (Phi3-style generate)", stock["reprefill"]),
        ("patched rule=position, cached step", position["step"]),
    ]
    for name, (tokens, seconds, error) in rows:
        _say(f"  {name:<42}{tokens:>11}{seconds * 1e3:>9.1f}{error:>11.3e}")
    patched_error = max(position["short"], position["long"])
    _say("")
    _say(
        f"patched (rule=position) incremental == full forward: max |diff| = {patched_error:.3e} "
        f"(tolerance {BOUNDARY_TOLERANCE:.0e})"
    )
    return dict(
        patched_error=patched_error,
        stock_drift=stock["long"],
        same_table=same_table,
        stock_switched=switched,
        patched_tokens=position["step"][0],
        reprefill_tokens=stock["reprefill"][0],
    )


# ---------------------------------------------------------------------------------------------------- driver
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--length", type=int, default=None, help="passkey prompt tokens (default: 4000 on CPU, 8000 on CUDA)"
    )
    parser.add_argument("--model", default="smollm2", help="smollm2 (default), a local HF model folder or a .gguf")
    parser.add_argument("--quick", action="store_true", help="shorter inputs and fewer rounds (a smoke test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random passkey")


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 iff every check passes, 1 if one fails, 2 if the model cannot be loaded."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("lr2kernels demo: --device cuda, but torch sees no CUDA device; use --device cpu")
        return 2
    progress = Progress(5)
    print(f"lr2kernels {lr2.__version__} demo on {_device_name(device)}; backends {lr2.available_backends()}")

    progress.step(f"load the model ({args.model}, fp32, {device.type})")
    try:
        model, tokenizer = _load(args.model, device)
    except (FileNotFoundError, ImportError, OSError, ValueError) as error:
        print(f"\nlr2kernels demo: cannot load the model: {error}")
        return 2
    from lr2kernels.hf.patch import SUPPORTED_MODEL_TYPES

    if model.config.model_type not in SUPPORTED_MODEL_TYPES:
        print(
            f"\nlr2kernels demo: lr2kernels.patch supports model types {sorted(SUPPORTED_MODEL_TYPES)}, "
            f"not {model.config.model_type!r}"
        )
        return 2
    _say(
        f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
        f"{model.config.num_hidden_layers} layers, max positions {model.config.max_position_embeddings}"
    )
    progress.done()

    checks: list[tuple[bool, str]] = []
    check = lambda ok, line: checks.append((bool(ok), line))  # noqa: E731
    text_length = 512 if args.quick else 812
    progress.step("logits: stock vs patched on real text")
    difference = check_logits(model, tokenizer, device, text_length)
    check(difference <= LOGIT_TOLERANCE, f"logits: max |patched - stock| = {difference:.3e}")
    progress.done()

    progress.step("speed: prefill and decode, stock vs patched")
    steps, reps = (8, 2) if args.quick else (32, 3)
    compare_speed(model, tokenizer, device, text_length, steps, reps)
    progress.done()

    longest = (2000 if device.type == "cuda" else 1000) if args.quick else (8000 if device.type == "cuda" else 4000)
    length = args.length or min(longest, model.config.max_position_embeddings)
    progress.step(f"passkey retrieval at {length} tokens, patched model")
    passed, prompt_length = check_passkey(model, tokenizer, device, length, args.seed)
    check(passed, f"passkey at {prompt_length} tokens")
    progress.done()

    progress.step(f"the L0 boundary: a LongRoPE table with L0 = {BOUNDARY_L0}, decoding across it")
    boundary = check_boundary(model, tokenizer, device)
    patched_error, same_table = boundary["patched_error"], boundary["same_table"]
    check(
        patched_error <= BOUNDARY_TOLERANCE, f"L0 boundary: patched incremental == full forward ({patched_error:.3e})"
    )
    check(
        boundary["stock_switched"] and same_table <= LOGIT_TOLERANCE,
        f"L0 boundary: stock HF longrope == patched on the same table ({same_table:.3e})",
    )
    tokens, reprefill = boundary["patched_tokens"], boundary["reprefill_tokens"]
    check(
        tokens == 1,
        f"L0 boundary: first token past L0 runs {tokens} token(s) through the model (re-prefill: {reprefill})",
    )
    progress.done()

    print("\nsummary")
    for ok, line in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {line}")
    everything = all(ok for ok, _ in checks)
    verdict = "all checks passed" if everything else "SOME CHECKS FAILED"
    print(f"lr2kernels demo: {verdict} ({progress.elapsed():.0f} s)", flush=True)
    return 0 if everything else 1


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


_PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+ \[")


def _load(name: str, device: torch.device):
    """load_model with the GGUF reader's and transformers' progress bars left out of the demo's output.

    Only what is written to ``sys.stderr`` while loading is captured; every line that is not a progress bar is
    passed on (logging handlers keep the stream they were made with and are not affected at all).
    """
    from lr2kernels.hf.models import load_model

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return load_model(name, device, torch.float32)
    finally:
        kept = [line for line in re.split(r"[\r\n]", captured.getvalue()) if line and not _PROGRESS_BAR.search(line)]
        if kept:
            print("\n".join(kept), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lr2kernels demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
