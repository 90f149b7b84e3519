"""How a target prompt relates to the source prompt, token by token (Prompt-to-Prompt's alignment).

Token positions are those of the text encoder's input: 0 is the start token, words follow, then the end token
and its padding up to the tokenizer's length (77 for SD 1.x).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch

from ctxedit.errors import UsageError

# Words that name nothing in the picture: never a reason to blend.
FUNCTION_WORDS = frozenset(
    "a an the and or of on in at to with is are was be being by for from into over under its his her their "
    "this that these those while".split()
)


def expanded(tokenizer, prompt: str) -> str:
    """The prompt as the tokenizer reads it: the token of an embedding of n vectors followed by its other n - 1
    tokens (`tokenizer.multi_vector_tokens`, set by `models.embeddings`); a prompt expanded already stays as it is."""
    for token, rest in getattr(tokenizer, "multi_vector_tokens", {}).items():
        spelled = " ".join([token, *rest]).replace("\\", "\\\\")  # a replacement template: backslashes escaped
        prompt = re.sub(rf"{re.escape(token)}(?!_\d)(?! {re.escape(rest[0])}\b)", spelled, prompt)
    return prompt


def token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids from the start token to the end token, without padding."""
    ids = tokenizer(expanded(tokenizer, prompt), truncation=True, max_length=tokenizer.model_max_length).input_ids
    return list(ids)


def word_tokens(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """(word, token positions) of each word of the prompt; CLIP's tokens mark the end of a word with </w>, and an
    embedding's token is a word of its own (with its other tokens, for an embedding of several vectors)."""
    words, pieces, positions = [], [], []
    added = tokenizer.get_added_vocab()
    tokens = tokenizer.convert_ids_to_tokens(token_ids(tokenizer, prompt)[1:-1])
    for position, token in enumerate(tokens, start=1):
        if token in added:
            if pieces:  # a word the embedding's token follows without a space
                words.append(("".join(pieces), positions))
                pieces, positions = [], []
            if words and re.fullmatch(rf"{re.escape(words[-1][0])}_\d+", token):
                words[-1][1].append(position)
            else:
                words.append((token, [position]))
            continue
        pieces.append(token)
        positions.append(position)
        if token.endswith("</w>") or position == len(tokens):
            words.append(("".join(pieces).removesuffix("</w>"), positions))
            pieces, positions = [], []
    return words


@dataclass(frozen=True)
class Alignment:
    """Target token position -> the source token position it shares, or -1 for a token of its own."""

    token_map: torch.Tensor  # (tokens,) long
    changed_source: list[int]  # source positions of the words that the target replaced or dropped
    changed_target: list[int]  # target positions of the words that the target replaced or added


def align(tokenizer, source: str, target: str) -> Alignment:
    """Align the two prompts' tokens (longest matching blocks); the end token and padding map onto the source's."""
    length = tokenizer.model_max_length
    src, tgt = token_ids(tokenizer, source), token_ids(tokenizer, target)
    token_map = torch.full((length,), -1, dtype=torch.long)
    matcher = difflib.SequenceMatcher(a=src[:-1], b=tgt[:-1], autojunk=False)  # words; end tokens below
    for block in matcher.get_matching_blocks():
        token_map[block.b : block.b + block.size] = torch.arange(block.a, block.a + block.size)
    changed_target = [i for i in range(1, len(tgt) - 1) if token_map[i] < 0]
    tail = torch.arange(len(tgt) - 1, length)  # end token and padding
    token_map[tail] = (tail - len(tgt) + len(src)).clamp(max=length - 1)
    kept_source = set(token_map[token_map >= 0].tolist())
    changed_source = [i for i in range(1, len(src) - 1) if i not in kept_source]
    return Alignment(token_map, changed_source, changed_target)


def content(tokenizer, prompt: str, positions: list[int]) -> list[int]:
    """The positions among `positions` that belong to words naming something (not function words)."""
    keep = set(positions)
    return [p for word, ps in word_tokens(tokenizer, prompt) if word not in FUNCTION_WORDS for p in ps if p in keep]


def phrases(tokenizer, prompt: str, positions: list[int]) -> list[int]:
    """`positions` grown to their phrases: each changed word with the words after it up to a function word, so
    that a changed adjective brings its noun ("a [yellow] circle and ..." -> "yellow circle")."""
    words, grown = word_tokens(tokenizer, prompt), []
    for k, (_, ps) in enumerate(words):
        if set(ps) & set(positions):
            grown += ps
            for word, more in words[k + 1 :]:
                if word in FUNCTION_WORDS or not word.isalnum():
                    break
                grown += more
    return sorted(set(grown))


def has_word(tokenizer, prompt: str, word: str) -> bool:
    return any(w == word.lower() for w, _ in word_tokens(tokenizer, prompt))


def named_words(tokenizer, prompt: str, words: list[str]) -> list[int]:
    """Token positions of the given words in the prompt; a word the prompt lacks is an error."""
    found = []
    by_word = word_tokens(tokenizer, prompt)
    for wanted in words:
        positions = [p for word, ps in by_word if word == wanted.lower() for p in ps]
        if not positions:
            raise UsageError(f"--blend word {wanted!r} is not in the prompt {prompt!r}")
        found += positions
    return found


_WEIGHTED = re.compile(r"\(([^():]+):\s*([^()]*)\)")


def parse_weights(tokenizer, prompt: str) -> tuple[str, dict[int, float]]:
    """(the prompt without weight syntax, token position -> weight) for prompts like "a (green:1.5) circle"."""
    plain, weights, end = "", {}, 0
    for match in _WEIGHTED.finditer(prompt):
        plain += prompt[end : match.start()]
        try:
            weight = float(match.group(2))
        except ValueError:
            number = f"weight {match.group(2)!r} in {match.group(0)!r} is not a number"
            raise UsageError(f"{number}; write e.g. (hat:1.5)") from None
        if not 0 < weight <= 10:
            raise UsageError(f"weights must be in (0, 10], got {match.group(0)!r}")
        first = len(token_ids(tokenizer, plain)) - 1  # after the start token and the words before
        plain += match.group(1).strip()
        weights |= dict.fromkeys(range(first, len(token_ids(tokenizer, plain)) - 1), weight)
        end = match.end()
    plain += prompt[end:]
    if "(" in plain or ")" in plain:
        raise UsageError(f"unbalanced or malformed weight in {prompt!r}: write (word:1.5), or leave out the brackets")
    return " ".join(plain.split()), weights


@dataclass(frozen=True)
class Target:
    """A target prompt, parsed once, as it relates to the source prompt: what the edit, the reranker and the scorers
    all take."""

    text: str  # without weight syntax: what is encoded
    weights: dict[int, float]  # target token position -> the weight the prompt gives it
    alignment: Alignment  # with the source prompt
    changed: list[int]  # target positions of the words naming something that the target replaces or adds
    blend: tuple[list[int], list[int]] | None  # (source, target) positions whose region may change; None: no blend
    tokens: int  # the target's tokens from the start token to the end token
    kept_phrases: dict[int, list[int]]  # weighted target token kept from the source -> source positions of its phrase


def parse_target(tokenizer, source: str, raw: str, blend_words: list[str] | None = ()) -> Target:
    """`raw` parsed against the `source` prompt; `blend_words`: the words to blend, () for the changed words'
    phrases, None for no blending."""
    text, weights = parse_weights(tokenizer, raw)
    alignment = align(tokenizer, source, text)
    changed_source = content(tokenizer, source, alignment.changed_source)
    changed = content(tokenizer, text, alignment.changed_target)
    if blend_words is None:
        blend = None
    elif blend_words:
        in_source = [w for w in blend_words if has_word(tokenizer, source, w)]
        in_target = [w for w in blend_words if has_word(tokenizer, text, w)]
        missing = [w for w in blend_words if w not in in_source + in_target]
        if missing:
            raise UsageError(f"--blend word {missing[0]!r} is in neither the source nor the target prompt")
        blend = named_words(tokenizer, source, in_source), named_words(tokenizer, text, in_target)
    elif changed_source or changed:
        blend = phrases(tokenizer, source, changed_source), phrases(tokenizer, text, changed)
    else:
        blend = None  # nothing named changed: nothing to localise
    source_of = alignment.token_map.tolist()
    kept = {token: phrases(tokenizer, source, [source_of[token]]) for token in weights if source_of[token] >= 0}
    return Target(text, weights, alignment, changed, blend, len(token_ids(tokenizer, text)), kept)
