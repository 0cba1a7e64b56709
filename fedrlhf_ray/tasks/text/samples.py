"""Sample generations of the global model, written by the driver each evaluated round.

They continue fixed public prompts, not any client's: a client's reviews are private, and the
driver already holds the global weights. A personal head (kept on the clients) is not in them.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.seeding import derive_seed
from fedrlhf_ray.tasks.text.generation import generate
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


class SampleWriter:
    """Continues :data:`PUBLIC_PROMPTS` with the global weights; the same seed every round."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.lm = load_lm(cfg)
        self.reference = self.lm.model
        self.policy = copy.deepcopy(self.lm.model)
        self.prompts = self.lm.encode(list(PUBLIC_PROMPTS))

    def text(self, round_index: int, weights: dict[str, np.ndarray]) -> str:
        state = {k.removeprefix(LM_PREFIX): torch.tensor(np.asarray(v)) for k, v in weights.items()
                 if k.startswith(LM_PREFIX)}
        self.policy.load_state_dict(state, strict=False)
        imdb = self.cfg.imdb()
        lines = [f"# round {round_index}: the global model continues {len(self.prompts)} public prompts "
                 f"({SAMPLES_PER_PROMPT} samples each, temperature {self.cfg.language_model().eval_temperature:g})", ""]
        for i, (text, ids) in enumerate(zip(PUBLIC_PROMPTS, self.prompts, strict=True)):
            gens = generate(
                self.policy, self.reference, [ids] * SAMPLES_PER_PROMPT, max_tokens=imdb.generate_tokens,
                eos_id=self.lm.eos_id, temperature=self.cfg.language_model().eval_temperature,
                seed=derive_seed(self.cfg.seed, "samples", i),
            )
            for cont in gens.continuations:
                lines.append(f"{text} ⟶{self.lm.decode(cont)}")
        return "\n".join(lines) + "\n"
