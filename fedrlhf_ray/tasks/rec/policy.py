"""The slate policy: an RLlib RLModule (new API stack) that scores every candidate.

One network with shared weights scores each candidate from (user history, candidate features,
learned item embedding); the scores are the logits of the ``Discrete(M)`` action distribution
and, unchanged, the ranking scores used by evaluation (NDCG, Spearman). The value head reads
the user representation and the pooled slate.

Only the forward pass lives here; PPO's loss stays in RLlib's learner.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SlateScorer(nn.Module):
    """Scores candidates for a user; plain torch, so evaluation can use it without RLlib."""

    def __init__(self, n_items: int, n_features: int, hidden: int, embedding_dim: int):
        super().__init__()
        self.embedding_dim = embedding_dim
        if embedding_dim > 0:
            self.item_embedding = nn.Embedding(n_items + 1, embedding_dim, padding_idx=0)
            nn.init.normal_(self.item_embedding.weight, std=0.01)
            with torch.no_grad():
                self.item_embedding.weight[0].zero_()
        self.item_encoder = _mlp([n_features + embedding_dim, hidden, hidden])
        self.user_encoder = _mlp([2 * hidden, hidden])
        self.score_head = _mlp([3 * hidden, hidden, 1])

    def encode_items(self, items: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.embedding_dim > 0:
            features = torch.cat([features, self.item_embedding(items.long())], dim=-1)
        return self.item_encoder(features)

    def encode_user(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        hist = self.encode_items(obs["history_items"], obs["history_features"])
        mask = (obs["history_items"] > 0).float()
        count = mask.sum(-1, keepdim=True).clamp(min=1.0)
        mean = (hist * mask.unsqueeze(-1)).sum(-2) / count
        ratings = obs["history_ratings"]
        centred = (ratings - (ratings * mask).sum(-1, keepdim=True) / count) * mask
        weighted = (hist * centred.unsqueeze(-1)).sum(-2) / count
        return self.user_encoder(torch.cat([mean, weighted], dim=-1))

    def forward(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (scores ``(B, M)``, user representation, candidate representations)."""
        user = self.encode_user(obs)
        cands = self.encode_items(obs["candidate_items"], obs["candidate_features"])
        u = user.unsqueeze(-2).expand_as(cands)
        scores = self.score_head(torch.cat([cands, u, cands * u], dim=-1)).squeeze(-1)
        return scores, user, cands


class SlatePolicyModule(TorchRLModule, ValueFunctionAPI):
    """PPO-ready RLModule around :class:`SlateScorer`.

    ``model_config`` keys: ``hidden``, ``embedding_dim`` (from ``PPOSettings``), ``n_items``,
    ``n_features`` (filled in from the env's observation space when missing).
    """

    def setup(self) -> None:
        cfg = cast(dict[str, Any], self.model_config)  # the dict build_ppo's RLModuleSpec passes
        space: Any = self.observation_space  # a gymnasium Dict space (RLlib types it Optional[Space])
        n_items = int(cfg.get("n_items") or space["candidate_items"].high.max())
        n_features = int(cfg.get("n_features") or space["candidate_features"].shape[-1])
        hidden = int(cfg["hidden"])
        self.scorer = SlateScorer(n_items, n_features, hidden, int(cfg["embedding_dim"]))
        self.value_head = _mlp([2 * hidden, hidden, 1])

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        scores, _, _ = self.scorer(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: scores}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        scores, user, cands = self.scorer(batch[Columns.OBS])
        embeddings = torch.cat([user, cands.mean(-2)], dim=-1)
        return {Columns.ACTION_DIST_INPUTS: scores, Columns.EMBEDDINGS: embeddings}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        if embeddings is None:
            _, user, cands = self.scorer(batch[Columns.OBS])
            embeddings = torch.cat([user, cands.mean(-2)], dim=-1)
        return self.value_head(embeddings).squeeze(-1)
