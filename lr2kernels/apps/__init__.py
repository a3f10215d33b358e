"""The applications built on the library: the ``lr2kernels`` command (``cli``) and what it runs: ``info``,
``demo``, ``bench`` (kernel, end-to-end and context-extension suites) and ``search_job`` (``lr2kernels search``).

``common`` holds what they share (options, model loading, timers, console tables); ``model_runs`` the ways they
run a transformers model (stock vs patched, greedy decoding, incremental vs full forward, the stock rotary modules
rebuilt for a table). Layer: the top. Nothing in the library below (tables, reference, ops, nn, hf, search)
imports this package, and ``import lr2kernels`` does not import it.
"""
