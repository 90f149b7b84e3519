"""Re-alignment's coarse stage (RealignDiff for video): candidate edits that really differ, scored without ground
truth (`scoring`), fused by their ranks, the best kept. The fine stage, re-weighting cross-attention, lives in
`attention.Reweighting` and is switched on by `EditSettings.realign` and prompt weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ctxedit import scoring
from ctxedit.attention import step_plan
from ctxedit.prompts import Target
from ctxedit.runs import source_frames
from ctxedit.scoring import Scores, fused_ranks
from ctxedit.settings import EditSettings
from ctxedit.tuned import Tuned

REALIGN_WEIGHT = 1.5  # --realign auto: attention weight of the words the target changes, inside their region
# Candidate k >= 1 changes the user's settings one way, one of each kind first; eta > 0 draws new noise from its own
# seed (with eta 0 and an inverted start, seeds alone would change nothing). A context scale needs a context adapter,
# a checkpoint the parameters kept during tuning (`tune --keep-checkpoints`): without them those are skipped.
VARIATIONS: tuple[tuple[str, float], ...] = (
    ("eta", 0.5),
    ("guidance", 1.5),  # times the user's
    ("keep_structure", -0.2),  # added to the user's, within [0, 1]
    ("context_scale", 0.5),  # times the user's
    ("checkpoint", 1),  # the n-th other parameters: the latest kept checkpoint first
    ("eta", 1.0),
    ("guidance", 0.67),
    ("keep_structure", 0.2),
    ("context_scale", 1.5),
    ("checkpoint", 2),
)
FURTHEST = {"guidance": (0.5, 2.5), "context_scale": (0.25, 2.0)}  # the factors later rounds may reach
# The scores shown to track the truth on the shapes world (benchmarks/README.md, "Re-alignment"): consistency
# (jitter) and preservation (drift); the rule was chosen on development clips. Text alignment is scored and
# recorded but not used: the UNet's attention mass tracks the truth backwards there, no rule using the caption
# reward did reliably better, and CLIP could not be checked.
RERANK_AXES = ("consistency", "preservation")


def behaviour(settings: EditSettings) -> tuple:
    """What an edit does with these settings: settings that act alike give the same (a seed without eta, fractions
    that come to the same steps)."""
    steps = step_plan(settings)
    seed = settings.seed if settings.eta else None
    fractions = {"keep_structure": 0.0, "keep_words": 0.0, "keep_inside": 0.0}
    return replace(settings, **fractions, candidates=1, seed=seed), steps.structure, steps.words, steps.inside


def candidate_settings(
    settings: EditSettings, count: int, seed: int, kept: Sequence[int] = (), context: bool = True
) -> list[EditSettings]:
    """The user's settings first, then `count - 1` variations of them that each act differently (`behaviour`):
    the variations in turn, each round further from the user's (eta draws with new seeds), those that would act like
    an earlier candidate skipped. `kept` are the run's kept tuning steps, `context` whether it has a context
    adapter."""
    weights = [step for step in (None, *reversed(kept)) if step != settings.checkpoint]  # the others, latest first
    usable = [
        (name, value)
        for name, value in VARIATIONS
        if (name != "context_scale" or context) and (name != "checkpoint" or value <= len(weights))
    ]
    first = replace(settings, candidates=1)
    candidates, seen = [first], {behaviour(first)}
    for k in itertools.count(1):
        if len(candidates) == count:
            break
        turn, kind = divmod(k - 1, len(usable))
        candidate = _variation(first, *usable[kind], turn, seed + k, weights)
        if candidate is not None and behaviour(candidate) not in seen:
            candidates.append(candidate)
            seen.add(behaviour(candidate))
    return candidates


def _variation(
    settings: EditSettings, name: str, value: float, turn: int, seed: int, weights: list[int | None]
) -> EditSettings | None:
    """The user's `settings` changed the way (`name`, `value`) says, in the `turn`-th round (0: as listed, then
    further); None where it cannot go further."""
    if name == "eta":
        return replace(settings, eta=value, seed=seed)
    if name == "checkpoint":
        index = value - 1 + turn * 2  # each round the next two kept checkpoints
        return replace(settings, checkpoint=weights[index], eta=0.0) if index < len(weights) else None
    if name == "keep_structure":
        keep = min(1.0, max(0.0, round(settings.keep_structure + value * (turn + 1), 3)))
        return replace(settings, keep_structure=keep, eta=0.0)
    factor = value ** (turn + 1)
    low, high = FURTHEST[name]
    if not low <= factor <= high:
        return None
    return replace(settings, **{name: round(getattr(settings, name) * factor, 3)}, eta=0.0)


def best_candidate(scores: list[Scores], axes: tuple[str, ...] = RERANK_AXES) -> int:
    """Index of the candidate with the best mean rank over `axes` (the first among equals)."""
    ranks = fused_ranks([s.axes() for s in scores], axes)
    return min(range(len(ranks)), key=lambda k: ranks[k])


def choose(
    settings: EditSettings, options: list[EditSettings], scores: list[Scores], paths: list[Path]
) -> tuple[int, list[dict]]:
    """(index of the chosen candidate, one record per candidate: what it changed from the user's `settings`, its
    scores and, where it was kept, its file)."""
    asked = replace(settings, candidates=1).to_dict()
    candidates = [
        {"index": k, "changes": {n: v for n, v in option.to_dict().items() if v != asked[n]},
         "scores": scores[k].axes()} | ({"path": str(paths[k])} if paths else {})
        for k, option in enumerate(options)
    ]  # fmt: skip
    return best_candidate(scores), candidates


class Reranker:
    """Scores the candidates of a tuned run's edits (`choose` picks one); loads each scorer and the source frames
    once."""

    def __init__(self, tuned: Tuned):
        self.tuned, self.scorers, self.source = tuned, {}, None

    def score(self, target: Target, settings: EditSettings, frames: np.ndarray) -> Scores:
        """The scores of one candidate's frames of an edit towards `target` with the user's `settings`."""
        tuned = self.tuned
        tuned.use(settings)  # the attention scorer runs the UNet: the parameters asked for
        key = (settings.scorer, settings.scorer_model)
        if key not in self.scorers:
            self.scorers[key] = scoring.text_scorer(*key, tuned.sd, tuned.model, tuned.windows(0))
        self.source = source_frames(tuned.record) if self.source is None else self.source
        return scoring.score(frames, self.source, target, self.scorers[key])
