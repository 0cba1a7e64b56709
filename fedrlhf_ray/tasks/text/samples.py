"""Sample generations on fixed public prompts, each evaluated round: of the global model, written
by the driver, and of each client's own model (its personal block, or fine-tuned), written by the
client in the clear only (the privacy modes refuse it, as they refuse plain evaluations).

The prompts are public, not any client's: a client's reviews are private.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.seeding import derive_seed
from fedrlhf_ray.tasks.text.generation import generate
from fedrlhf_ray.tasks.text.lm import LanguageModel
from fedrlhf_ray.tasks.text.prepare import load_lm

PUBLIC_PROMPTS = (
    "This movie was",
    "I have to say that the acting",
    "The story of this film",
    "If you like horror movies,",
    "My wife and I watched this",
    "The director of this film",
    "Honestly, the ending",
    "I rented this movie because",
)
SAMPLES_PER_PROMPT = 2
LM_PREFIX = "lm."  # the policy module's LM parameters (see fedrlhf_ray.tasks.text.policy)


def public_samples(cfg: ExperimentConfig, lm: LanguageModel, policy: Any, reference: Any, whose: str,
                   round_index: int) -> str:
    """``policy``'s continuations of :data:`PUBLIC_PROMPTS` (the same seed every round and for
    every model, so that files compare line by line)."""
    imdb = cfg.imdb()
    prompts = lm.encode(list(PUBLIC_PROMPTS))
    lines = [f"# round {round_index}: {whose} continues {len(prompts)} public prompts "
             f"({SAMPLES_PER_PROMPT} samples each, temperature {cfg.language_model().eval_temperature:g})", ""]
    for i, (text, ids) in enumerate(zip(PUBLIC_PROMPTS, prompts, strict=True)):
        gens = generate(
            policy, reference, [ids] * SAMPLES_PER_PROMPT, max_tokens=imdb.generate_tokens,
            eos_id=lm.eos_id, temperature=cfg.language_model().eval_temperature,
            seed=derive_seed(cfg.seed, "samples", i),
        )
        for cont in gens.continuations:
            lines.append(f"{text} ⟶{lm.decode(cont)}")
    return "\n".join(lines) + "\n"


class SampleWriter:
    """Continues :data:`PUBLIC_PROMPTS` with the global weights (a personal block, kept on the
    clients, is the reference's here; each client's own model writes its samples itself)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.lm = load_lm(cfg)
        self.reference = self.lm.model
        self.policy = copy.deepcopy(self.lm.model)

    def text(self, round_index: int, weights: dict[str, np.ndarray]) -> str:
        state = {k.removeprefix(LM_PREFIX): torch.tensor(np.asarray(v)) for k, v in weights.items()
                 if k.startswith(LM_PREFIX)}
        self.policy.load_state_dict(state, strict=False)
        return public_samples(self.cfg, self.lm, self.policy, self.reference, "the global model", round_index)
