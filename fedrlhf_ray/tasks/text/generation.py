"""Sampling continuations from a policy LM and the IMDb evaluation metrics (pure torch and NumPy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedrlhf_ray.tasks.text.judges import repeated_ngram_rate
from fedrlhf_ray.tasks.text.lm import fluency
from fedrlhf_ray.tasks.text.policy import categorical_kl


@dataclass(frozen=True)
class Generations:
    """Continuations of a batch of prompts, with what the metrics need of each."""

    continuations: list[np.ndarray]  # generated tokens, end-of-text excluded
    reference_logprobs: list[np.ndarray]  # log p_ref of each generated token
    kl: np.ndarray  # Σ over generated positions of KL(π ‖ π_ref), per continuation


@torch.no_grad()
def generate(
    policy: Any, reference: Any, prompts: Sequence[np.ndarray], *, max_tokens: int, eos_id: int,
    temperature: float, seed: int,
) -> Generations:
    """Sample up to ``max_tokens`` tokens after each prompt (all of one length) from ``policy``.

    Sampling uses its own seeded generator; no global RNG is touched.
    """
    generator = torch.Generator().manual_seed(int(seed))
    ids = torch.as_tensor(np.stack([np.asarray(p, dtype=np.int64) for p in prompts]))
    batch = ids.shape[0]
    alive = torch.ones(batch, dtype=torch.bool)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    ref_lp: list[list[float]] = [[] for _ in range(batch)]
    kl = torch.zeros(batch)
    for _ in range(max_tokens):
        logits = policy(input_ids=ids).logits[:, -1].float()
        ref_logits = reference(input_ids=ids).logits[:, -1].float()
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        step_kl = categorical_kl(logits, ref_logits)
        ref_logp = torch.log_softmax(ref_logits, dim=-1).gather(-1, nxt[:, None]).squeeze(-1)
        for i in torch.nonzero(alive).flatten().tolist():
            kl[i] += step_kl[i]
            if int(nxt[i]) == eos_id:
                alive[i] = False
            else:
                tokens[i].append(int(nxt[i]))
                ref_lp[i].append(float(ref_logp[i]))
        if not alive.any():
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return Generations(
        [np.asarray(t, dtype=np.int64) for t in tokens], [np.asarray(r) for r in ref_lp], kl.numpy().astype(float)
    )


def distinct_n(continuations: Sequence[np.ndarray], n: int) -> float:
    """Distinct-n: unique n-grams over all n-grams of the continuations (0 when there are none)."""
    grams = [tuple(c[i:i + n]) for c in continuations for i in range(len(c) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _perplexity(logprobs: Sequence[np.ndarray]) -> float:
    tokens = np.concatenate(list(logprobs)) if logprobs else np.zeros(0)
    return math.exp(float(-tokens.mean())) if len(tokens) else float("nan")


def text_metrics(
    gens: Generations, own_sentiment: np.ndarray, independent_sentiment: np.ndarray, lexicon_sentiment: np.ndarray,
    lam: float, vocab_size: int, judge_logprobs: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """The per-client IMDb evaluation metrics of one batch of generations; ``judge_logprobs``:
    the continuations' token log-probabilities under the judge LM, where there is one."""

    fluencies = np.array([fluency(lp, vocab_size) for lp in gens.reference_logprobs])
    return {
        "sentiment": float(np.mean(own_sentiment)),
        "sentiment_independent": float(np.mean(independent_sentiment)),
        "sentiment_lexicon": float(np.mean(lexicon_sentiment)),
        "fluency": float(np.mean(fluencies)),
        "reward": float(np.mean(lam * own_sentiment + (1.0 - lam) * fluencies)),
        "kl_to_reference": float(np.mean(gens.kl)),
        "perplexity_reference": _perplexity(gens.reference_logprobs),
        **({"perplexity_judge": _perplexity(judge_logprobs)} if judge_logprobs is not None else {}),
        "distinct_1": distinct_n(gens.continuations, 1),
        "distinct_2": distinct_n(gens.continuations, 2),
        "repeated_bigram_rate": repeated_ngram_rate(gens.continuations, 2),
        "length": float(np.mean([len(c) for c in gens.continuations])),
    }
