import copy
import dataclasses

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

import lr2kernels as lr2
from lr2kernels.hf.patch import is_patched
from lr2kernels.search import (
    IGNORE_INDEX,
    NeedleEvaluator,
    NeedleSample,
    PasskeyEvaluator,
    baseline_tables,
    needle_samples,
)
from lr2kernels.search.outputs import save_hf_config


def manual_loss(model, samples) -> float:
    """Mean cross-entropy over every labelled token, from a plain full forward of an unpatched model."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            logits = model(sample.input_ids[None]).logits[0, :-1]  # [L-1, V]
            labels = sample.labels[1:]
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    return total / count


def model_table(model) -> lr2.RopeTable:
    return lr2.RopeTable.from_hf_config(model.config)


def test_loss_with_the_models_own_table_equals_a_plain_forward(tokenizer, tiny_model):
    samples = needle_samples(tokenizer, 200, num_samples=3, depth=[0.1, 0.5, 0.9], seed=2)
    expected = manual_loss(tiny_model, samples)
    score = NeedleEvaluator(copy.deepcopy(tiny_model), samples)(model_table(tiny_model))
    assert score.loss == pytest.approx(expected, rel=1e-5)
    assert score.perplexity == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert len(score.sample_losses) == 3 and score.accuracy == 0.0  # a random model retrieves nothing


def test_loss_equals_stock_transformers_loading_the_exported_config(tokenizer, tiny_model, tmp_path):
    # The table the search scores is the table transformers builds from the config.json the search writes.
    table = baseline_tables(model_table(tiny_model), 512)["YaRN"]
    samples = needle_samples(tokenizer, 400, num_samples=2, seed=4)  # past L_train = 256: the long table
    save_hf_config(tmp_path, tiny_model.config, table)
    stock = LlamaForCausalLM(AutoConfig.from_pretrained(tmp_path)).eval()
    stock.load_state_dict(tiny_model.state_dict())
    score = NeedleEvaluator(copy.deepcopy(tiny_model), samples)(table)
    assert score.loss == pytest.approx(manual_loss(stock, samples), rel=1e-5)


def test_tables_are_swapped_in_place(tokenizer, tiny_model):
    samples = needle_samples(tokenizer, 400, num_samples=2, seed=1)
    tables = baseline_tables(model_table(tiny_model), 1024)
    evaluator = NeedleEvaluator(tiny_model, samples)
    first = evaluator(tables["PI"])
    other = evaluator(tables["NTK"])
    again = evaluator(tables["PI"])
    assert first == again and other.loss != first.loss
    fresh = NeedleEvaluator(copy.deepcopy(tiny_model), samples)(tables["NTK"])
    assert fresh.loss == pytest.approx(other.loss, rel=1e-6)
    assert is_patched(tiny_model)


def test_batches_of_samples_give_the_same_score(tokenizer, tiny_model):
    samples = needle_samples(tokenizer, 300, num_samples=4, seed=3)
    table = baseline_tables(model_table(tiny_model), 512)["NTK"]
    one = NeedleEvaluator(tiny_model, samples)(table)
    two = NeedleEvaluator(tiny_model, samples, batch_size=3)(table)
    assert two.loss == pytest.approx(one.loss, rel=1e-5)
    assert two.sample_losses == pytest.approx(one.sample_losses, rel=1e-5)


def _with_answer(sample: NeedleSample, answer: list[int]) -> NeedleSample:
    """The sample's prompt followed by ``answer`` (every answer token labelled)."""
    prompt = sample.prompt_ids
    ids = torch.cat([prompt, torch.tensor(answer)])
    labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), torch.tensor(answer)])
    return dataclasses.replace(sample, input_ids=ids, labels=labels, answer="")


@torch.no_grad()
def test_accuracy_is_exactly_greedy_decoding(tokenizer, tiny_model):
    table = baseline_tables(model_table(tiny_model), 512)["YaRN"]
    (base,) = needle_samples(tokenizer, 300, seed=9)  # past L_train: the answer is decoded with the long table
    lr2.patch(tiny_model, table=table)
    ids, greedy = base.prompt_ids[None], []
    for _ in range(4):  # what the model answers: its own greedy continuation
        greedy.append(int(tiny_model(ids).logits[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[greedy[-1]]])], dim=1)
    wrong = greedy[:3] + [(greedy[3] + 1) % len(tokenizer)]
    samples = [_with_answer(base, greedy), _with_answer(base, wrong), base]
    score = NeedleEvaluator(tiny_model, samples)(table)
    passkey = PasskeyEvaluator(tiny_model, samples)
    answers = passkey.answers(table)
    assert [ok for ok, _ in answers] == [True, False, False]
    assert answers[0][1] == greedy and answers[1][1] == greedy
    assert score.accuracy == passkey(table) == pytest.approx(1 / 3)


def test_bad_arguments(tokenizer, tiny_model):
    samples = needle_samples(tokenizer, 200, seed=0)
    with pytest.raises(ValueError, match="samples"):
        NeedleEvaluator(tiny_model, [])
    with pytest.raises(ValueError, match="batch_size"):
        NeedleEvaluator(tiny_model, samples, batch_size=0)
    evaluator = NeedleEvaluator(tiny_model, samples)
    with pytest.raises(TypeError, match="table"):
        evaluator({"long_factor": [1.0] * 8})
    wrong_head = lr2.RopeTable.default(head_dim=32, base=1e4, max_position=256)
    with pytest.raises(ValueError, match="head_dim"):
        evaluator(wrong_head)
