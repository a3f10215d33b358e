"""lr2kernels.hf.appending_layer: a cache layer that appends in place returns, at every update, exactly what
transformers' ``DynamicLayer`` (``torch.cat``) returns, through everything that replaces or edits a layer's tensors;
and no tensor anyone holds ever changes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from lr2kernels.hf.appending_layer import AppendingDynamicLayer

BATCH, HEADS, HEAD_DIM = 2, 3, 8


def rows(n: int, seed: int, batch: int = BATCH, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """New keys and values ``[B, H, n, D]`` (values of another head size, as some models have)."""
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, HEADS, n, HEAD_DIM, generator=generator, dtype=dtype),
        torch.randn(batch, HEADS, n, HEAD_DIM + 4, generator=generator, dtype=dtype),
    )


def assert_same(plain: DynamicLayer, appending: DynamicLayer, returned=None) -> None:
    for name in ("keys", "values"):
        want, got = getattr(plain, name), getattr(appending, name)
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want), name
    if returned is not None:
        assert returned[0] is appending.keys and returned[1] is appending.values


def _in_place_edit(layer):
    layer.keys[:, :, 1] += 0.5  # through the view: the buffer row the view shows


def _assign_other(layer):
    layer.keys, layer.values = layer.keys * 2, layer.values - 1  # other tensors, other numbers


EDITS = {
    "crop": lambda layer: layer.crop(-3),
    "reorder": lambda layer: layer.reorder_cache(torch.tensor([1, 0])),
    "select": lambda layer: layer.batch_select_indices(torch.tensor([1, 0])),
    "repeat-then-select": lambda layer: (layer.batch_repeat_interleave(2), layer.batch_select_indices(torch.arange(2))),
    "in-place": _in_place_edit,
    "assign": _assign_other,
    "reset": lambda layer: layer.reset(),
    "offload-prefetch": lambda layer: (layer.offload(), layer.prefetch()),
}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_updates_equal_concatenation_through_edits(edit):
    plain, appending = DynamicLayer(), AppendingDynamicLayer()
    seed = 0

    def update(n: int) -> None:
        nonlocal seed
        seed += 1
        new = rows(n, seed)
        plain.update(*new)
        assert_same(plain, appending, appending.update(*new))

    update(5)  # a prefill (concatenated onto the empty layer)
    for _ in range(4):
        update(1)
    storage = appending.keys.untyped_storage().data_ptr()
    update(1)
    assert appending.keys.untyped_storage().data_ptr() == storage  # appended in place
    held = appending.keys, appending.keys.clone()
    EDITS[edit](plain)
    EDITS[edit](appending)
    assert_same(plain, appending)
    for n in (1, 1, 7, 1):
        update(n)
    for _ in range(300):  # past the first buffer's room (5 + 256 rows): the buffers grow, keeping every row
        update(1)
    if edit != "in-place":
        assert torch.equal(held[0], held[1])  # a view handed out before never changes


def test_rows_that_cannot_be_written_in_place_concatenate_as_stock():
    plain, appending = DynamicLayer(), AppendingDynamicLayer()
    for n, seed in ((4, 1), (1, 2), (1, 3)):
        new = rows(n, seed)
        plain.update(*new)
        appending.update(*new)
    cases = [
        rows(1, 4, dtype=torch.float64),  # type promotion, as torch.cat does
        rows(2, 5),
        tuple(t.requires_grad_() for t in rows(1, 6)),  # autograd history: the result must carry it
    ]
    for new in cases:
        want = plain.update(*new)
        got = appending.update(*new)
        assert_same(plain, appending, got)
        assert got[0].requires_grad == want[0].requires_grad
    with torch.inference_mode():  # inference tensors: transformers' own update
        new = rows(1, 7)
        plain.update(*new)
        assert_same(plain, appending, appending.update(*new))


@pytest.mark.parametrize("first", ["copy", "original"])
def test_shallow_copies_do_not_write_into_each_other(first):
    layer = AppendingDynamicLayer()
    for n, seed in ((4, 1), (1, 2), (1, 3)):
        layer.update(*rows(n, seed))
    twin = AppendingDynamicLayer.__new__(AppendingDynamicLayer)
    twin.__dict__.update(vars(layer))  # a shallow copy that shares the buffers and views (copy.copy drops them)
    assert type(copy.copy(layer)) is DynamicLayer
    before = layer.keys.clone(), layer.values.clone()
    twin_new, layer_new = rows(1, 10), rows(1, 11)
    for which in (twin, layer) if first == "copy" else (layer, twin):
        which.update(*(twin_new if which is twin else layer_new))
    for got, new in ((twin, twin_new), (layer, layer_new)):
        assert torch.equal(got.keys, torch.cat([before[0], new[0]], dim=2))
        assert torch.equal(got.values, torch.cat([before[1], new[1]], dim=2))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_are_plain_dynamic_layers_that_continue_exactly(how):
    plain, appending = DynamicLayer(), AppendingDynamicLayer()
    for n, seed in ((4, 1), (1, 2), (1, 3)):
        new = rows(n, seed)
        plain.update(*new)
        appending.update(*new)
    copied = copy.deepcopy(appending) if how == "deepcopy" else pickle.loads(pickle.dumps(appending))
    assert type(copied) is DynamicLayer and not any(name.startswith("_lr2") for name in vars(copied))
    assert_same(plain, copied)
    new = rows(1, 4)
    plain.update(*new)
    copied.update(*new)
    assert_same(plain, copied)
