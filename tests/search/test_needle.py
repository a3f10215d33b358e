import pytest
import torch

from lr2kernels.search import IGNORE_INDEX, needle_samples, package_text, read_texts


@pytest.mark.parametrize("length", [300, 1000, 2049])
def test_exact_length_and_answer_only_labels(tokenizer, length):
    for sample in needle_samples(tokenizer, length, num_samples=3, depth=[0.0, 0.5, 1.0], seed=3):
        assert sample.input_ids.shape == sample.labels.shape == (length,)
        labelled = (sample.labels != IGNORE_INDEX).nonzero().flatten()
        assert labelled.numel() > 0
        assert int(labelled.min()) >= sample.answer_start  # nothing before the answer is labelled
        assert torch.equal(sample.labels[labelled], sample.input_ids[labelled])
        assert tokenizer.decode(sample.labels[labelled]).strip() == sample.answer
        assert len(sample.answer) == 7 and sample.answer.isdigit()
        assert tokenizer.decode(sample.input_ids[sample.answer_start :]).strip() == sample.answer
        assert "magic number is" in tokenizer.decode(sample.prompt_ids[-8:])


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_needle_at_the_requested_depth(tokenizer, depth):
    (sample,) = needle_samples(tokenizer, 1500, depth=depth, seed=1)
    needle_text = tokenizer.decode(sample.input_ids[sample.needle_start : sample.needle_end])
    assert f"magic number is {sample.answer}" in needle_text
    # The needle sits after `depth` of the filler; the filler is everything but the needle, question and answer.
    question_start = sample.answer_start - len(tokenizer(
        "\n\nQuestion: what is the special magic number mentioned in the text above?\n"
        "Answer: The special magic number is", add_special_tokens=False).input_ids)  # fmt: skip
    filler = question_start - (sample.needle_end - sample.needle_start)
    assert sample.needle_start == round(depth * filler)
    assert sample.input_ids[: sample.needle_start].tolist().count(tokenizer(" magic").input_ids[0]) == 0


def test_deterministic_by_seed(tokenizer):
    first = needle_samples(tokenizer, 800, num_samples=2, seed=7)
    again = needle_samples(tokenizer, 800, num_samples=2, seed=7)
    other = needle_samples(tokenizer, 800, num_samples=2, seed=8)
    for a, b in zip(first, again):
        assert torch.equal(a.input_ids, b.input_ids) and a.answer == b.answer
    assert first[0].answer != other[0].answer
    assert first[0].answer != first[1].answer  # samples differ from each other too


def test_user_text_files(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("Alpacas graze on the high plains of the Andes every single morning. " * 20)
    (tmp_path / "b.txt").write_text("")
    text = read_texts([tmp_path / "a.txt", tmp_path / "b.txt"])
    (sample,) = needle_samples(tokenizer, 600, text=text, digits=5)
    assert "Alpacas" in tokenizer.decode(sample.input_ids) and "essay" not in text
    assert len(sample.answer) == 5
    with pytest.raises(ValueError, match="text_files"):
        read_texts([tmp_path / "b.txt"])
    assert len(package_text()) > 1000


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(length=20), "length"),
        (dict(length=500, depth=1.5), "depth"),
        (dict(length=500, num_samples=2, depth=[0.1]), "depth"),
        (dict(length=500, num_samples=0), "num_samples"),
        (dict(length=500, digits=0), "digits"),
        (dict(length=500, text="too short"), "text"),
    ],
)
def test_bad_arguments_are_named(tokenizer, kwargs, name):
    with pytest.raises(ValueError, match=name):
        needle_samples(tokenizer, **kwargs)
