"""Benchmarks (``lr2kernels bench``): kernel level against stock attention + separate RoPE, and end to end on a
real model (stock vs patched). Timings live here and in ``benchmarks/results``, never in tests."""
