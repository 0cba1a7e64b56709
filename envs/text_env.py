"""The IMDb text env: a policy language model continues a review prompt one token at a time.

Observation (``Dict``): ``tokens`` ``(W,)`` int64 — the prompt and the tokens generated so far,
left-aligned in a window of W = P + G (padded with ``pad_id``); ``length`` ``(1,)`` int64 — how
many of them are real. Action: ``Discrete(V)``, the next token. The episode ends, terminated, after
G tokens or when the policy writes end-of-text. The length limit is part of the task, not a cut
of a longer episode: the text is scored there and nothing follows, so no value may be bootstrapped
past it (marking it ``truncated`` made PPO's critic add V(final state) to every return, and V grew
to 6–8 against returns of at most 1). The only reward is terminal::

    r = λ·sentiment + (1 − λ)·fluency

with both scores given by the scorer the client sets (its own sentiment model, and 1 − NLL/ln V
under the frozen reference LM). Prompts and λ come from the client (``set_client``); with several
λ (the centralized baseline's pooled client) each prompt carries its own client's λ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import gymnasium as gym
import numpy as np


class ContinuationScorer(Protocol):
    def __call__(self, prompt: np.ndarray, continuation: np.ndarray) -> tuple[float, float]:
        """(sentiment in [0, 1], fluency) of ``continuation`` written after ``prompt``."""


def terminal_reward(lam: float, sentiment: float, fluency: float) -> float:
    """The paper's reward λ·sentiment + (1 − λ)·fluency."""
    return lam * sentiment + (1.0 - lam) * fluency


class TextContinuationEnv(gym.Env):
    """Continue one of the client's prompts; see the module docstring."""

    metadata = {"render_modes": []}  # noqa: RUF012 - gymnasium declares it a plain class attribute

    def __init__(
        self,
        prompts: Sequence[np.ndarray],
        vocab_size: int,
        generate_tokens: int,
        eos_id: int,
        scorer: ContinuationScorer | None = None,
        lam: float | Sequence[float] = 0.5,
        pad_id: int | None = None,
        seed: int | None = None,
        prompt_tokens: int | None = None,
    ) -> None:
        prompts = [np.asarray(p, dtype=np.int64) for p in prompts]
        if not prompts or not all(len(p) for p in prompts):
            raise ValueError("prompts: need at least one prompt, each with at least one token")
        # Fixed by the caller, the window does not depend on which client's prompts come later.
        self.prompt_tokens = int(prompt_tokens or max(len(p) for p in prompts))
        self.vocab_size = int(vocab_size)
        self.generate_tokens = int(generate_tokens)
        self.eos_id = int(eos_id)
        self.pad_id = int(eos_id if pad_id is None else pad_id)
        self.window = self.prompt_tokens + self.generate_tokens
        self.observation_space = gym.spaces.Dict({
            "tokens": gym.spaces.Box(0, self.vocab_size - 1, shape=(self.window,), dtype=np.int64),
            "length": gym.spaces.Box(1, self.window, shape=(1,), dtype=np.int64),
        })
        self.action_space = gym.spaces.Discrete(self.vocab_size)
        self.scorer = scorer
        self.set_client(prompts, lam)
        self._rng = np.random.default_rng(seed)
        self._tokens = np.full(self.window, self.pad_id, dtype=np.int64)
        self._length = 0
        self._prompt_length = 0
        self._lam = 0.0

    def set_client(self, prompts: Sequence[np.ndarray], lam: float | Sequence[float],
                   scorer: ContinuationScorer | None = None) -> None:
        """Serve another client: its prompts, λ (one, or one per prompt) and scorer."""
        prompts = [np.asarray(p, dtype=np.int64)[: self.prompt_tokens] for p in prompts]
        if not prompts or not all(len(p) for p in prompts):
            raise ValueError("prompts: need at least one prompt, each with at least one token")
        lams = np.broadcast_to(np.asarray(lam, dtype=np.float64), (len(prompts),)).copy()
        self.prompts, self.lams = prompts, lams
        if scorer is not None:
            self.scorer = scorer

    def _obs(self) -> dict[str, np.ndarray]:
        return {"tokens": self._tokens.copy(), "length": np.array([self._length], dtype=np.int64)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        index = int(self._rng.integers(len(self.prompts)))
        prompt = self.prompts[index]
        self._tokens = np.full(self.window, self.pad_id, dtype=np.int64)
        self._tokens[: len(prompt)] = prompt
        self._length = self._prompt_length = len(prompt)
        self._lam = float(self.lams[index])
        return self._obs(), {"prompt_index": index}

    def step(self, action: Any):
        token = int(action)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"action {action!r} is outside Discrete({self.vocab_size})")
        self._tokens[self._length] = token
        self._length += 1
        generated = self._length - self._prompt_length
        ended_text = token == self.eos_id
        terminated = ended_text or generated >= self.generate_tokens
        reward, info = 0.0, {}
        if terminated:
            # End-of-text is a choice of the policy, but not part of the text that is scored.
            end = self._length - 1 if ended_text else self._length
            continuation = self._tokens[self._prompt_length:end]
            prompt = self._tokens[: self._prompt_length]
            sentiment, fluency = self.scorer(prompt, continuation) if self.scorer is not None else (0.0, 0.0)
            reward = terminal_reward(self._lam, sentiment, fluency)
            info = {"sentiment": sentiment, "fluency": fluency, "lambda": self._lam, "generated": generated}
        return self._obs(), float(reward), terminated, False, info
