"""Re-alignment's coarse stage (RealignDiff for video): candidate edits that really differ, scored without ground
truth (`scoring`), fused by their ranks, the best kept. The fine stage, re-weighting cross-attention, lives in
`attention.Reweighting` and is switched on by `EditSettings.realign` and prompt weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ctxedit import prompts, scoring
from ctxedit.scoring import Scores, fused_ranks
from ctxedit.settings import EditSettings

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
# The scores shown to track the truth on the shapes world (README, "Re-alignment"): consistency (jitter) and
# preservation (drift); the rule was chosen on development clips. Text alignment is scored and recorded but not
# used: the UNet's attention mass tracks the truth backwards there, no rule using the caption reward did reliably
# better, and CLIP could not be checked.
RERANK_AXES = ("consistency", "preservation")


def candidate_settings(
    settings: EditSettings, count: int, seed: int, kept: Sequence[int] = (), context: bool = True
) -> list[EditSettings]:
    """The user's settings first, then `count - 1` variations of them (cycling, each eta draw with a new seed);
    `kept` are the run's kept tuning steps, `context` whether it has a context adapter."""
    weights = [step for step in (None, *reversed(kept)) if step != settings.checkpoint]  # the others, latest first
    usable = [
        (name, value)
        for name, value in VARIATIONS
        if (name != "context_scale" or context) and (name != "checkpoint" or value <= len(weights))
    ]
    candidates = [settings]
    for k in range(1, count):
        name, value = usable[(k - 1) % len(usable)]
        if name == "eta":
            candidates.append(replace(settings, eta=value, seed=seed + k))
        elif name == "checkpoint":
            candidates.append(replace(settings, checkpoint=weights[value - 1], eta=0.0))
        elif name == "keep_structure":
            keep = min(1.0, max(0.0, round(settings.keep_structure + value, 3)))
            candidates.append(replace(settings, keep_structure=keep, eta=0.0))
        else:  # guidance, context_scale: times the user's
            candidates.append(replace(settings, **{name: round(getattr(settings, name) * value, 3)}, eta=0.0))
    return [replace(c, candidates=1) for c in candidates]


def best_candidate(scores: list[Scores], axes: tuple[str, ...] = RERANK_AXES) -> int:
    """Index of the candidate with the best mean rank over `axes` (the first among equals)."""
    ranks = fused_ranks([s.axes() for s in scores], axes)
    return min(range(len(ranks)), key=lambda k: ranks[k])


class Reranker:
    """Scores the candidates of an edit and chooses one (`realign.best_candidate`); loads each scorer once."""

    def __init__(self, tuned):
        self.tuned, self.scorers, self.source = tuned, {}, None

    def choose(self, request, options: list[EditSettings], made: dict[int, np.ndarray]) -> tuple[int, list[dict]]:
        """(index of the chosen candidate, one record per candidate: what it changed and its scores) for an
        `editing.EditRequest` whose candidates `options` gave the frames `made`."""
        from ctxedit.editing import source_frames, use_weights

        tuned, settings = self.tuned, request.settings
        use_weights(tuned, settings.checkpoint)  # the attention scorer runs the UNet: the parameters asked for
        key = (settings.scorer, settings.scorer_model)
        if key not in self.scorers:
            self.scorers[key] = scoring.text_scorer(*key, tuned.sd, tuned.model, tuned.record["settings"]["prompt"])
        self.source = source_frames(tuned.record) if self.source is None else self.source
        target, _ = prompts.parse_weights(tuned.sd.tokenizer, request.target)
        scores = [scoring.score(made[k], self.source, target, self.scorers[key]) for k in range(len(options))]
        asked = replace(settings, candidates=1).to_dict()
        candidates = [
            {"index": k, "changes": {n: v for n, v in option.to_dict().items() if v != asked[n]},
             "scores": scores[k].axes()}
            for k, option in enumerate(options)
        ]  # fmt: skip
        return best_candidate(scores), candidates
