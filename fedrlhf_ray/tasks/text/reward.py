"""The IMDb reward's two scores, as the text env asks for them at the end of an episode."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedrlhf_ray.tasks.text.lm import continuation_logprobs, fluency


class ContinuationScorer:
    """(sentiment, fluency) of a continuation: P(positive) of the continuation alone by the client's
    sentiment model, and 1 − NLL/ln V of it after the prompt under the frozen reference LM.

    It also keeps the running means of what it scored since :meth:`drain` (training metrics that
    stay scalars).
    """

    def __init__(self, sentiment: Any, reference: Any, vocab_size: int) -> None:
        self.sentiment = sentiment
        self.reference = reference
        self.vocab_size = int(vocab_size)
        self._scored: list[tuple[float, float]] = []

    def __call__(self, prompt: np.ndarray, continuation: np.ndarray) -> tuple[float, float]:
        positive = float(self.sentiment.positive_probability([continuation])[0])
        logprobs = continuation_logprobs(self.reference, prompt, [continuation])[0]
        fluent = fluency(logprobs, self.vocab_size)
        self._scored.append((positive, fluent))
        return positive, fluent

    def drain(self) -> dict[str, float]:
        scored, self._scored = self._scored, []
        if not scored:
            return {}
        s, f = np.mean(np.asarray(scored), axis=0)
        return {"sentiment": float(s), "fluency": float(f), "episodes": float(len(scored))}
