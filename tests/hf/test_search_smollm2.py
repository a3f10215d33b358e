"""The search's evaluators on the real model (SmolLM2-135M, L_train 8192), at lengths a CPU test affords."""

import pytest

import lr2kernels as lr2
from lr2kernels.search import NeedleEvaluator, PasskeyEvaluator, needle_samples, passkey_samples


@pytest.fixture(scope="module")
def evaluators(smollm2):
    import copy

    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    needles = NeedleEvaluator(model, needle_samples(tokenizer, 1024, num_samples=2, depth=[0.1, 0.4], seed=0))
    passkeys = PasskeyEvaluator(model, passkey_samples(tokenizer, 1024, num_samples=2, seed=1))
    return model, needles, passkeys


def test_the_model_retrieves_needles_with_its_own_table(evaluators):
    model, needles, passkeys = evaluators
    own = lr2.RopeTable.from_hf_config(model.config)
    score = needles(own)
    assert score.accuracy == 1.0 and score.loss < 0.5
    assert passkeys(own) == 1.0


def test_a_needle_loss_tells_a_broken_table_apart(evaluators):
    # Every frequency divided by 64 well inside the pretraining length: positions blur, retrieval degrades.
    model, needles, passkeys = evaluators
    own = lr2.RopeTable.from_hf_config(model.config)
    blurred = lr2.RopeTable.pi(head_dim=own.head_dim, base=own.base, original_max_position=128, max_position=8192)
    assert needles(blurred).loss > needles(own).loss + 1.0
