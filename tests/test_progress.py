"""Long steps are never silent: the apps' heartbeat prints where the model is while a step runs."""

from __future__ import annotations

import re
import time

import torch

from lr2kernels.apps.common import Heartbeat
from tests.models import tiny_model


def test_heartbeat_prints_forwards_and_layers_then_removes_its_hooks(capsys):
    model = tiny_model("llama", layers=3)
    with Heartbeat("a long step", model, every=0.05), torch.no_grad():
        deadline = time.perf_counter() + 0.4
        while time.perf_counter() < deadline:
            model(torch.randint(1, 100, (1, 24)))
    lines = [line for line in capsys.readouterr().out.splitlines() if "a long step" in line]
    assert lines, "no heartbeat line"
    assert all(
        line.strip().startswith("... a long step:") and re.search(r"forward \d+, layer [1-3]/3", line) for line in lines
    ), lines
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)


def test_heartbeat_without_a_model_prints_elapsed_time(capsys):
    with Heartbeat("waiting", every=0.05):
        time.sleep(0.2)
    out = capsys.readouterr().out
    assert "... waiting:" in out and "layer" not in out
