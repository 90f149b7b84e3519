"""Token alignment of a source and a target prompt (Prompt-to-Prompt's replace and refine)."""

import re

import pytest
from transformers import CLIPTokenizer

from ctxedit import prompts
from ctxedit.errors import UsageError
from ctxedit.toy.demo import TOY_MODEL

SOURCE = "a red circle moving right and a blue square standing still on a gray background"


@pytest.fixture(scope="module")
def words() -> CLIPTokenizer:
    """The bundled shapes-world tokenizer: one token per word."""
    return CLIPTokenizer.from_pretrained(TOY_MODEL / "tokenizer")


@pytest.fixture(scope="module")
def letters(tiny_model) -> CLIPTokenizer:
    """The tiny test model's tokenizer: one token per letter, so words span several tokens."""
    return CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")


def test_a_replaced_word_takes_its_own_map_and_the_rest_align(words):
    target = SOURCE.replace("blue", "yellow")
    alignment = prompts.align(words, SOURCE, target)
    blue = prompts.named_words(words, SOURCE, ["blue"])
    assert blue == [8] and alignment.changed_source == blue and alignment.changed_target == [8]
    expected = list(range(77))
    expected[8] = -1
    assert alignment.token_map.tolist() == expected


def test_inserted_words_shift_the_alignment_and_the_end_token_follows(words):
    source, target = "a red circle moving right", "a blue circle moving right on a gray background"
    alignment = prompts.align(words, source, target)
    mapping = alignment.token_map.tolist()
    assert mapping[:10] == [0, 1, -1, 3, 4, 5, -1, -1, -1, -1]  # "blue" replaces "red", four words are new
    assert mapping[10] == 6 and mapping[76] == 72  # the end token and the padding after it
    assert alignment.changed_source == [2]
    assert prompts.content(words, target, alignment.changed_target) == [2, 8, 9]  # blue, gray, background


def test_words_spanning_several_tokens_are_grouped(letters):
    grouped = prompts.word_tokens(letters, "a man is skiing")
    assert [w for w, _ in grouped] == ["a", "man", "is", "skiing"]
    assert grouped[1][1] == [2, 3, 4] and grouped[3][1] == [7, 8, 9, 10, 11, 12]
    alignment = prompts.align(letters, "a man is skiing", "a woman is skiing")
    assert prompts.content(letters, "a woman is skiing", alignment.changed_target) == [2, 3]  # "wo"
    assert prompts.has_word(letters, "a woman is skiing", "Woman")


def test_a_word_the_prompt_lacks_is_a_clear_error(words):
    with pytest.raises(UsageError, match="'hat' is not in the prompt"):
        prompts.named_words(words, SOURCE, ["hat"])


def test_prompt_weights_are_parsed_onto_their_tokens(words, letters):
    assert prompts.parse_weights(words, "a (green:1.5) circle") == ("a green circle", {2: 1.5})
    assert prompts.parse_weights(words, "a (green circle: 0.8) on a gray background") == (
        "a green circle on a gray background", {2: 0.8, 3: 0.8},
    )  # fmt: skip
    assert prompts.parse_weights(words, "a green circle") == ("a green circle", {})
    clean, weights = prompts.parse_weights(letters, "a (hat:2) on")  # a word of 3 letter tokens
    assert clean == "a hat on" and weights == {2: 2.0, 3: 2.0, 4: 2.0}
    bad = {
        "a (green:x) circle": "'x' in '(green:x)' is not a number",
        "a (green circle": "unbalanced or malformed weight",
        "a (green) circle": "unbalanced or malformed weight",
        "a green) circle": "unbalanced or malformed weight",
        "a (green:0) circle": "weights must be in (0, 10]",
    }
    for prompt, message in bad.items():
        with pytest.raises(UsageError, match=re.escape(message)):
            prompts.parse_weights(words, prompt)
