"""RoPE factor tables: one type for every Hugging Face rope type.

Every HF rope type (default, linear, dynamic, yarn, llama3, longrope) is "a per-dimension factor table plus an
attention factor": ``inv_freq[i] = 1 / (factor[i] * base ** (2i / d))`` and cos/sin are multiplied by the attention
factor. LongRoPE carries two tables, one for inputs up to ``original_max_position`` (L0) and one for longer inputs.
:class:`RopeTable` holds exactly that, and converts from and to HF configs.

Numerics follow ``transformers.modeling_rope_utils``: ``inv_freq`` and the angles are computed in fp32 in the same
order of operations as HF's longrope path, so a table read from a longrope or default config reproduces HF's cos/sin
bit for bit. Converted types (linear, dynamic, yarn, llama3) get their factors in float64 from the closed forms, and
agree with HF to an ulp of ``inv_freq``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["RopeTable", "ROPE_TYPES"]

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
_FORMAT = "lr2kernels.RopeTable"
_FORMAT_VERSION = 1
MAX_POSITION = 2**31 - 1  # positions and sizes are int32 in the kernels
_FP32_MAX = float(torch.finfo(torch.float32).max)
_FP32_TINY = float(torch.finfo(torch.float32).tiny)
# transformers' config classes that declare a top-level `original_max_position_embeddings` themselves, so that HF
# reads L0 from it. For every other model type a top-level L0 is ignored by HF (see `RopeTable.from_hf_config`).
_HF_TOP_LEVEL_L0_MODEL_TYPES = frozenset({"phi3", "phimoe"})
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def resolve_cpu_trig() -> None:
    """Resolve the CPU kernels of cos and sin once per process, on one thread, before any sizeable call.

    PyTorch's CPU builds route float unary ops to oneMKL's VML, which picks each function's kernel lazily on its
    first call. When that first call runs on several intra-op threads at once, a thread can compute its chunk with a
    low-accuracy kernel (pytorch/pytorch#188792, oneMKL 2024.2): on this project's machine, in about a third of fresh
    processes, the first fp32 ``cos`` over a few hundred positions errs by up to 1.5e-4 instead of 4e-8, and a RoPE
    table built from it is silently wrong. A one-element call per function and dtype resolves the kernel first
    (about 1 ms, once). Called before the package computes cos/sin, by ``patch`` and by ``load_model`` (so that a
    stock model's own rotary embedding is protected too).
    """
    global _TRIG_RESOLVED
    if _TRIG_RESOLVED:
        return
    for dtype in (torch.float32, torch.float64):
        one = torch.zeros(1, dtype=dtype)
        one.cos(), one.sin()
    _TRIG_RESOLVED = True


_TRIG_RESOLVED = False


def _default_attention_factor(max_position: int, original_max_position: int) -> float:
    """LongRoPE's default: sqrt(1 + ln(s) / ln(L0)) with s = max_position / L0; 1 when s <= 1."""
    scale = max_position / original_max_position
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_max_position))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _check_factors(name: str, factors: Any, expected_len: int) -> tuple[float, ...]:
    if isinstance(factors, torch.Tensor):
        factors = factors.detach().cpu().double().tolist()
    elif hasattr(factors, "tolist") and not isinstance(factors, (list, tuple)):  # numpy arrays
        factors = factors.tolist()
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(f"{name}: expected a sequence of {expected_len} numbers, got {type(factors).__name__}")
    if len(factors) != expected_len:
        raise ValueError(f"{name}: expected rotary_dim // 2 = {expected_len} factors, got {len(factors)}")
    values = []
    for i, f in enumerate(factors):
        if isinstance(f, bool) or not isinstance(f, numbers.Real):  # numpy floats and ints are Real too
            raise TypeError(f"{name}[{i}]: expected a number, got {type(f).__name__}")
        f = float(f)
        if not math.isfinite(f) or f <= 0.0:
            raise ValueError(f"{name}[{i}]: expected a finite factor > 0, got {f}")
        values.append(f)
    return tuple(values)


def _check_frequencies(name: str, factors: tuple[float, ...], base: float, rotary_dim: int) -> None:
    """Every inverse frequency 1 / (factor * base^(2i/d)) must be a finite, non-zero float32 (HF computes it so)."""
    for i, factor in enumerate(factors):
        inv_freq = 1.0 / (factor * base ** (2 * i / rotary_dim))
        if not _FP32_TINY <= inv_freq <= _FP32_MAX:
            raise ValueError(
                f"{name}[{i}]: expected a factor whose frequency 1 / (factor * base^(2i/d)) is a finite, non-zero "
                f"float32, got {factor} (frequency {inv_freq:.3g})"
            )


def _check_positive(name: str, value: Any, *, integer: bool) -> None:
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name}: expected {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if integer and value > MAX_POSITION:
        shown = value if value < 10**20 else f"a {len(str(value))}-digit number"
        raise ValueError(f"{name}: expected at most {MAX_POSITION} (positions are int32 in the kernels), got {shown}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite value > 0, got {value}")


@dataclasses.dataclass(frozen=True)
class RopeTable:
    """Per-dimension RoPE factors for short and long inputs, plus the attention factor.

    Attributes:
        head_dim: size of one attention head.
        rotary_dim: number of rotated channels (even, <= head_dim); the first ``rotary_dim`` channels of q and k are
            rotated with NeoX split-half pairing (channel j with j + rotary_dim / 2), the rest pass through.
        base: RoPE base (``rope_theta``).
        original_max_position: L0, the pretraining length; the long table is used for sequences longer than it.
        max_position: the extended length the table is made for.
        short_factor: ``rotary_dim // 2`` factors dividing the frequencies for sequences of length <= L0.
        long_factor: ``rotary_dim // 2`` factors for sequences longer than L0.
        attention_factor: multiplies cos and sin (so q.k scales by its square) with the long table, and with the
            short table too unless ``short_attention_factor`` is set (HF's longrope applies one factor to both).
        short_attention_factor: the factor for the short table when it differs (PhiMoE's ``short_mscale``).
    """

    head_dim: int
    rotary_dim: int
    base: float
    original_max_position: int
    max_position: int
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    attention_factor: float = 1.0
    short_attention_factor: float | None = None
    _inv_freq_cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("head_dim", "rotary_dim", "original_max_position", "max_position"):
            _check_positive(name, getattr(self, name), integer=True)
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.rotary_dim % 2:
            raise ValueError(f"rotary_dim: expected an even number of rotated channels, got {self.rotary_dim}")
        if self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim: expected at most head_dim = {self.head_dim}, got {self.rotary_dim}")
        _check_positive("base", self.base, integer=False)
        if self.base == 1.0:
            raise ValueError("base: expected a RoPE base != 1 (e.g. 10000.0), got 1.0")
        if self.original_max_position > self.max_position:
            raise ValueError(
                f"original_max_position: expected L0 <= max_position = {self.max_position}, "
                f"got {self.original_max_position}"
            )
        half = self.rotary_dim // 2
        object.__setattr__(self, "short_factor", _check_factors("short_factor", self.short_factor, half))
        object.__setattr__(self, "long_factor", _check_factors("long_factor", self.long_factor, half))
        for name in ("short_factor", "long_factor"):
            _check_frequencies(name, getattr(self, name), float(self.base), self.rotary_dim)
        _check_positive("attention_factor", self.attention_factor, integer=False)
        object.__setattr__(self, "attention_factor", float(self.attention_factor))
        object.__setattr__(self, "base", float(self.base))
        if self.short_attention_factor is not None:
            _check_positive("short_attention_factor", self.short_attention_factor, integer=False)
            object.__setattr__(self, "short_attention_factor", float(self.short_attention_factor))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def longrope(
        cls,
        *,
        head_dim: int,
        base: float,
        original_max_position: int,
        max_position: int,
        short_factor: Sequence[float],
        long_factor: Sequence[float],
        attention_factor: float | None = None,
        rotary_dim: int | None = None,
        short_attention_factor: float | None = None,
    ) -> RopeTable:
        """A LongRoPE table. ``attention_factor=None`` gives sqrt(1 + ln(s)/ln(L0)), s = max_position / L0."""
        if attention_factor is None:
            _check_positive("original_max_position", original_max_position, integer=True)
            _check_positive("max_position", max_position, integer=True)
            attention_factor = _default_attention_factor(max_position, original_max_position)
        return cls(
            head_dim=head_dim,
            rotary_dim=head_dim if rotary_dim is None else rotary_dim,
            base=base,
            original_max_position=original_max_position,
            max_position=max_position,
            short_factor=short_factor,
            long_factor=long_factor,
            attention_factor=attention_factor,
            short_attention_factor=short_attention_factor,
        )

    @classmethod
    def default(cls, *, head_dim: int, base: float, max_position: int, rotary_dim: int | None = None) -> RopeTable:
        """Plain RoPE: every factor 1, no attention scaling, never switches tables."""
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        ones = (1.0,) * (rotary_dim // 2)
        return cls(head_dim, rotary_dim, base, max_position, max_position, ones, ones, 1.0)

    @classmethod
    def _static(
        cls,
        head_dim: int,
        base: float,
        original_max_position: int,
        max_position: int,
        rotary_dim: int | None,
        factors: Sequence[float],
        attention_factor: float,
    ) -> RopeTable:
        # Baselines scale every length the same way (as HF's linear / yarn types do): short table == long table.
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        return cls(head_dim, rotary_dim, base, original_max_position, max_position, factors, factors, attention_factor)

    @classmethod
    def pi(
        cls, *, head_dim: int, base: float, original_max_position: int, max_position: int, rotary_dim: int | None = None
    ) -> RopeTable:
        """Position interpolation: every frequency divided by s = max_position / L0."""
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        scale = max_position / original_max_position
        return cls._static(
            head_dim, base, original_max_position, max_position, rotary_dim, [scale] * (rotary_dim // 2), 1.0
        )

    @classmethod
    def ntk(
        cls, *, head_dim: int, base: float, original_max_position: int, max_position: int, rotary_dim: int | None = None
    ) -> RopeTable:
        """NTK-aware scaling: base -> base * s^(d/(d-2)), i.e. factor[i] = s^(2i/(d-2))."""
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        scale = max_position / original_max_position
        factors = ntk_factors(scale, rotary_dim)
        return cls._static(head_dim, base, original_max_position, max_position, rotary_dim, factors, 1.0)

    @classmethod
    def yarn(
        cls,
        *,
        head_dim: int,
        base: float,
        original_max_position: int,
        max_position: int,
        rotary_dim: int | None = None,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        attention_factor: float | None = None,
        truncate: bool = True,
    ) -> RopeTable:
        """YaRN: interpolate low frequencies by s, keep high ones, ramp in between; attention 0.1 ln(s) + 1."""
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        scale = max_position / original_max_position
        factors = yarn_factors(scale, rotary_dim, base, original_max_position, beta_fast, beta_slow, truncate)
        if attention_factor is None:
            attention_factor = _yarn_mscale(scale)
        return cls._static(head_dim, base, original_max_position, max_position, rotary_dim, factors, attention_factor)

    @classmethod
    def from_hf_config(cls, config: Any, seq_len: int | None = None) -> RopeTable:
        """Read the RoPE of a Hugging Face config (a ``PretrainedConfig`` or its ``config.json`` dict).

        Handles ``rope_parameters`` (transformers >= 5) and ``rope_scaling`` (older configs, vLLM), rope types
        default, linear, dynamic, yarn, llama3 and longrope, partial rotary, Phi3's top-level
        ``original_max_position_embeddings`` and PhiMoE's ``short_mscale`` / ``long_mscale``.

        L0 for longrope is the top-level ``original_max_position_embeddings`` when present. For a ``llama``
        LongRoPE2 config, the rope parameters alone say L0 = ``max_position_embeddings`` (transformers standardises
        them before the top-level field is set, and re-reads it only when it builds the rotary module), so code that
        reads them never switches to the long table. Here the top-level value wins, with a one-time warning naming
        both values.

        Args:
            config: HF config object or dict.
            seq_len: only for rope type ``dynamic``: the current length; the long table is HF's dynamic-NTK table
                for that length (HF recomputes it as the sequence grows). Ignored by the other types.
        """
        return _from_hf_config(cls, config, seq_len)

    # ------------------------------------------------------------------ math
    @property
    def scale(self) -> float:
        """s = max_position / original_max_position."""
        return self.max_position / self.original_max_position

    def factors(self, long: bool) -> tuple[float, ...]:
        return self.long_factor if long else self.short_factor

    def attention_factor_for(self, long: bool) -> float:
        if not long and self.short_attention_factor is not None:
            return self.short_attention_factor
        return self.attention_factor

    def use_long(self, seq_len: int) -> bool:
        """HF's rule: the long table iff the sequence (max position + 1) is longer than L0."""
        return int(seq_len) > self.original_max_position

    def _inv_freq(self, long: bool, device: torch.device | str | None = None) -> torch.Tensor:
        # Cached, shared tensor: callers inside the package never modify it. Every cos/sin the package computes
        # starts here, so this is where the CPU trig kernels are resolved (resolve_cpu_trig).
        resolve_cpu_trig()
        key = (bool(long), str(torch.device(device) if device is not None else torch.device("cpu")))
        cached = self._inv_freq_cache.get(key)
        if cached is None:
            # Same ops, same order, same dtype as transformers' `_compute_longrope_parameters`. A shared cache is made
            # of plain tensors even under torch.inference_mode, or a later call with autograd could not use it.
            with torch.inference_mode(False), torch.no_grad():
                factors = torch.tensor(self.factors(long), dtype=torch.float32)
                shape = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
                cached = (1.0 / (factors * self.base**shape)).to(key[1])
            self._inv_freq_cache[key] = cached
        return cached

    def _inv_freq_pair(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[2, rotary_dim // 2]`` fp32, row 0 the short table's frequencies, row 1 the long one's: cached, one
        tensor object per device for every call (the Triton decode keeps its angle table per frequencies' tensor)."""
        key = ("pair", str(torch.device(device) if device is not None else torch.device("cpu")))
        cached = self._inv_freq_cache.get(key)
        if cached is None:
            # Stacked on the CPU and copied, as _inv_freq's own values are: inside a CUDA graph capture a device-side
            # stack would only be recorded (the cached pair would hold nothing until a replay); the copy of pageable
            # memory is refused there instead, loudly.
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, as in _inv_freq
                cached = torch.stack([self._inv_freq(False), self._inv_freq(True)]).to(key[1])
            self._inv_freq_cache[key] = cached
        return cached

    def _cos_sin_prefix(
        self, long: bool, length: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions 0..length-1 ``[length, rotary_dim]``, cached (capacity doubles as needed).

        The values are exactly ``cos_sin(arange(length), long)``'s: the same elementwise fp32 ops per position.
        Shared, read-only tensors for the package's own decode paths, which would otherwise redo the trig for the
        whole cache at every step.
        """
        key = ("cos_sin", bool(long), str(torch.device(device) if device is not None else torch.device("cpu")))
        cached = self._inv_freq_cache.get(key)
        if cached is None or cached[0].shape[0] < length:
            capacity = max(256, 1 << max(length - 1, 1).bit_length())
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, as in _inv_freq
                cached = self.cos_sin(torch.arange(capacity, device=key[2]), long=long)
            self._inv_freq_cache[key] = cached
        return cached[0][:length], cached[1][:length]

    def inv_freq(self, long: bool, device: torch.device | str | None = None) -> torch.Tensor:
        """fp32 inverse frequencies ``[rotary_dim // 2]`` of the short (``long=False``) or long table."""
        return self._inv_freq(long, device).clone()

    def cos_sin(self, position_ids: torch.Tensor, long: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for integer positions, HF layout, fp32, multiplied by the attention factor.

        Args:
            position_ids: integer tensor of any shape ``[...]``.
            long: which table; ``None`` applies HF's rule to the whole tensor: long iff ``max(position_ids) + 1 > L0``.

        Returns:
            ``(cos, sin)``, each ``[..., rotary_dim]`` fp32 (the two halves repeat: NeoX split-half layout).
        """
        position_ids = _as_positions(position_ids)
        if long is None:
            long = position_ids.numel() > 0 and self.use_long(int(position_ids.max()) + 1)
        inv_freq = self._inv_freq(long, position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # [..., rotary_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [..., rotary_dim]
        factor = self.attention_factor_for(long)
        return emb.cos() * factor, emb.sin() * factor

    # ------------------------------------------------------------------ export / persistence
    def to_hf_rope_parameters(self) -> dict[str, Any]:
        """HF ``rope_parameters`` (also valid as ``rope_scaling``) that transformers loads into the same cos/sin.

        Plain tables come out as ``default``; everything else as ``longrope`` with an explicit
        ``attention_factor``, ``factor`` (s) and ``original_max_position_embeddings``. Put ``max_position`` in the
        config's ``max_position_embeddings`` and ``head_dim`` in its ``head_dim``.
        """
        params: dict[str, Any] = {"rope_theta": self.base}
        is_plain = (
            all(f == 1.0 for f in self.short_factor + self.long_factor)
            and self.attention_factor == 1.0
            and self.short_attention_factor in (None, 1.0)
            and self.original_max_position == self.max_position
        )
        if is_plain:
            params["rope_type"] = "default"
        else:
            params.update(
                rope_type="longrope",
                short_factor=list(self.short_factor),
                long_factor=list(self.long_factor),
                original_max_position_embeddings=self.original_max_position,
                factor=self.scale,
                attention_factor=self.attention_factor,
            )
            if self.short_attention_factor is not None:
                params["short_mscale"] = self.short_attention_factor
                params["long_mscale"] = self.attention_factor
        if self.rotary_dim != self.head_dim:
            params["partial_rotary_factor"] = _partial_rotary_factor(self.rotary_dim, self.head_dim)
        return params

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        fields["short_factor"] = list(self.short_factor)
        fields["long_factor"] = list(self.long_factor)
        return {"format": _FORMAT, "version": _FORMAT_VERSION, **fields}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RopeTable:
        if not isinstance(data, Mapping):
            raise TypeError(f"data: expected a dict written by RopeTable.to_dict / save, got {type(data).__name__}")
        if data.get("format") != _FORMAT:
            raise ValueError(f"data: expected format '{_FORMAT}', got {data.get('format')!r}")
        if data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"data: expected version {_FORMAT_VERSION}, got {data.get('version')!r}")
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        missing = [n for n in names if n not in data and n != "short_attention_factor"]
        if missing:
            raise ValueError(f"data: missing fields {missing}")
        return cls(**{n: data[n] for n in names if n in data})

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON (factors as exact float reprs, so ``load`` gives an equal table)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> RopeTable:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, Mapping):
            raise ValueError(f"path: expected a RopeTable JSON object in {os.fspath(path)}, got {type(data).__name__}")
        return cls.from_dict(data)


# ---------------------------------------------------------------------- closed forms of the other rope types
def ntk_factors(scale: float, rotary_dim: int) -> list[float]:
    """NTK-aware factors: base * s^(d/(d-2)) as per-dimension factors s^(2i/(d-2))."""
    if scale <= 1.0:
        return [1.0] * (rotary_dim // 2)
    return [scale ** (2 * i / (rotary_dim - 2)) for i in range(rotary_dim // 2)]


def yarn_factors(
    scale: float,
    rotary_dim: int,
    base: float,
    original_max_position: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> list[float]:
    """YaRN's per-dimension factors (transformers' `_compute_yarn_parameters` written as factors, float64)."""

    def correction_dim(num_rotations: float) -> float:
        return (rotary_dim * math.log(original_max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    factors = []
    for i in range(rotary_dim // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrapolation = 1.0 - ramp  # 1 keeps the original frequency, 0 interpolates fully
        factors.append(1.0 / ((1.0 - extrapolation) / scale + extrapolation))
    return factors


def llama3_factors(
    rotary_dim: int, base: float, factor: float, low_freq_factor: float, high_freq_factor: float, original_max: int
) -> list[float]:
    """Llama 3.1's per-dimension factors; the wavelength bands are classified on HF's fp32 frequencies."""
    shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    wavelen = (2 * math.pi / (1.0 / (base**shape))).tolist()
    low_freq_wavelen = original_max / low_freq_factor
    high_freq_wavelen = original_max / high_freq_factor
    factors = []
    for w in wavelen:
        if w < high_freq_wavelen:
            factors.append(1.0)
        elif w > low_freq_wavelen:
            factors.append(float(factor))
        else:
            smooth = (original_max / w - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return factors


def dynamic_ntk_factors(rotary_dim: int, factor: float, seq_len: int, max_position: int) -> list[float]:
    """HF dynamic NTK at length ``seq_len``: base' = base * (f*L/Lmax - (f-1))^(d/(d-2)), as factors."""
    seq_len = max(seq_len, max_position)
    ratio = (factor * seq_len / max_position - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    return [ratio ** (2 * i / rotary_dim) for i in range(rotary_dim // 2)]


# ---------------------------------------------------------------------- HF config parsing
def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _partial_rotary_factor(rotary_dim: int, head_dim: int) -> float:
    # HF computes rotary_dim = int(head_dim * factor): pick the float that truncates back to rotary_dim.
    factor = rotary_dim / head_dim
    while int(head_dim * factor) < rotary_dim:
        factor = math.nextafter(factor, math.inf)
    return factor


def _as_positions(position_ids: Any) -> torch.Tensor:
    if not isinstance(position_ids, torch.Tensor):
        position_ids = torch.as_tensor(position_ids)
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids: expected an integer tensor, got dtype {position_ids.dtype}")
    return position_ids


def _from_hf_config(cls: type[RopeTable], config: Any, seq_len: int | None) -> RopeTable:
    rope = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise TypeError(f"config.rope_parameters: expected a dict, got {type(rope).__name__}")
    if any(isinstance(v, Mapping) for v in rope.values()):
        raise ValueError(
            "config.rope_parameters: per-layer-type rope parameters are not supported; expected one flat dict"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.rope_parameters['rope_type']: expected one of {list(ROPE_TYPES)}, got {rope_type!r}")

    if not isinstance(config, Mapping) and not rope and _get(config, "rope_theta") is None:
        # A config object of a model without RoPE (GPT-2's); plain dicts keep HF's default base of 10000.
        model_type = _get(config, "model_type")
        raise ValueError(
            f"config: expected a RoPE model (rope_parameters, rope_scaling or rope_theta), got none in a "
            f"{model_type!r} config"
        )
    base = rope.get("rope_theta", _get(config, "rope_theta", 10000.0))
    max_position = _get(config, "max_position_embeddings")
    if max_position is None:
        raise ValueError("config.max_position_embeddings: expected an int, got None")
    head_dim = _get(config, "head_dim")
    if not head_dim:
        hidden_size, num_heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        if not hidden_size or not num_heads:
            raise ValueError(
                "config.head_dim: expected head_dim, or hidden_size and num_attention_heads to derive it, got "
                f"head_dim={head_dim!r}, hidden_size={hidden_size!r}, num_attention_heads={num_heads!r}"
            )
        head_dim = hidden_size // num_heads
    partial = rope.get("partial_rotary_factor", _get(config, "partial_rotary_factor", 1.0)) or 1.0
    rotary_dim = int(head_dim * partial)
    half = rotary_dim // 2
    top_level_l0 = _get(config, "original_max_position_embeddings")
    rope_l0 = rope.get("original_max_position_embeddings")

    if rope_type == "default":
        return cls.default(head_dim=head_dim, base=base, max_position=max_position, rotary_dim=rotary_dim)
    if rope_type in ("linear", "dynamic", "llama3"):
        required = ("factor", "low_freq_factor", "high_freq_factor") if rope_type == "llama3" else ("factor",)
        for key in required:
            if rope.get(key) is None:
                raise ValueError(f"config.rope_parameters['{key}']: expected a number for rope_type {rope_type!r}")
    if rope_type == "linear":
        factors = [float(rope["factor"])] * half
        return cls._static(head_dim, base, max_position, max_position, rotary_dim, factors, 1.0)
    if rope_type == "dynamic":
        long_factors = [1.0] * half
        extended = max_position
        if seq_len is not None and seq_len > max_position:
            long_factors = dynamic_ntk_factors(rotary_dim, float(rope["factor"]), seq_len, max_position)
            extended = int(seq_len)
        return cls(head_dim, rotary_dim, base, max_position, extended, [1.0] * half, long_factors, 1.0)

    # yarn, llama3 and longrope carry L0; HF standardises a missing one to max_position_embeddings.
    l0 = rope_l0 if rope_l0 is not None else (top_level_l0 if top_level_l0 is not None else max_position)
    if rope_type == "yarn":
        if top_level_l0 is not None and _get(config, "model_type") in _HF_TOP_LEVEL_L0_MODEL_TYPES:
            l0 = top_level_l0
        factor = rope.get("factor") or max_position / l0
        factors = yarn_factors(
            float(factor),
            rotary_dim,
            base,
            l0,
            rope.get("beta_fast") or 32.0,
            rope.get("beta_slow") or 1.0,
            rope.get("truncate", True),
        )
        attention = rope.get("attention_factor")
        if attention is None:
            mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention = _yarn_mscale(factor)
        return cls._static(head_dim, base, min(l0, max_position), max_position, rotary_dim, factors, attention)
    if rope_type == "llama3":
        factors = llama3_factors(
            rotary_dim, base, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], l0
        )
        return cls._static(head_dim, base, min(l0, max_position), max_position, rotary_dim, factors, 1.0)

    # longrope: L0 from the top-level field when present (Phi3 style, and the LongRoPE2 LLaMA3 configs).
    if top_level_l0 is not None:
        l0 = top_level_l0
        model_type = _get(config, "model_type")
        if isinstance(config, Mapping) and model_type in _HF_TOP_LEVEL_L0_MODEL_TYPES:
            hf_l0 = top_level_l0
        else:  # what transformers' standardisation leaves in (or puts into) rope_parameters
            hf_l0 = rope_l0 if rope_l0 is not None else max_position
        if hf_l0 != l0:
            _warn_once(
                f"l0-trap-{model_type}-{l0}-{hf_l0}",
                f"config: the top-level original_max_position_embeddings is {l0} but the rope parameters say L0 = "
                f"{hf_l0} (model_type {model_type!r}). lr2kernels uses L0 = {l0}: the long table for sequences longer "
                f"than {l0} tokens. transformers >= 5 re-reads the top-level value when it builds the rotary module; "
                f"code that reads only the rope parameters would use {hf_l0} and never switch.",
            )
    for key in ("short_factor", "long_factor"):
        if key not in rope:
            raise ValueError(f"config.rope_parameters['{key}']: expected a list of {half} factors, got nothing")
    attention = rope.get("attention_factor")
    if attention is None:
        scale = rope.get("factor") or max_position / l0
        attention = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(l0))
    short_attention = None
    if rope.get("long_mscale") is not None:
        attention = rope["long_mscale"]
    if rope.get("short_mscale") is not None and rope.get("short_mscale") != attention:
        short_attention = rope["short_mscale"]
    return cls(
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        base=base,
        original_max_position=l0,
        max_position=max_position,
        short_factor=rope["short_factor"],
        long_factor=rope["long_factor"],
        attention_factor=attention,
        short_attention_factor=short_attention,
    )
