"""Judges of the generated text that share nothing with the clients' reward: VADER's lexicon
sentiment (rules and a hand-made lexicon of social-media English, knowing nothing of IMDb or of
any client's reviews), and the rate of continuations that repeat themselves."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


class LexiconJudge:
    """VADER's compound score of the decoded continuation, mapped from [−1, 1] to [0, 1] (0.5:
    neutral; "It is a film." scores 0.5, where the clients' bag-of-tokens family scored 1.0)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.decode = decode
        self.analyzer = SentimentIntensityAnalyzer()

    def positive_probability(self, continuations: Sequence[np.ndarray]) -> np.ndarray:
        compound = [self.analyzer.polarity_scores(self.decode(c.tolist()))["compound"] for c in continuations]
        return (np.asarray(compound, dtype=np.float64) + 1.0) / 2.0


def repeated_ngram_rate(continuations: Sequence[np.ndarray], n: int = 2) -> float:
    """The share of continuations in which some n-gram of tokens occurs twice (degenerate,
    looping text; 0 when there are none)."""
    if not continuations:
        return 0.0
    repeats = 0
    for c in continuations:
        grams = [tuple(c[i:i + n].tolist()) for i in range(len(c) - n + 1)]
        repeats += len(set(grams)) < len(grams)
    return repeats / len(continuations)
