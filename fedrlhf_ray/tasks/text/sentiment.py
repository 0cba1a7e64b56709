"""Sentiment scorers: P(positive | text) for the IMDb reward.

:class:`BagOfTokens` is the client-side reward model: logistic regression over the mean of token
unigram and hashed token-bigram embeddings (fastText's linear model), fitted on the client's own
labelled reviews, or by Bradley–Terry on a simulated human's comparisons. The same model trained on
the full IMDb training set is the independent evaluator. :class:`HFSentiment` wraps a Hugging Face
sequence classifier (the paper's ``lvwerra/distilbert-imdb``) when it is available locally.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

# Large odd multiplier of the bigram hash (the 64-bit golden ratio), so neighbouring ids spread.
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def feature_ids(tokens: np.ndarray, vocab_size: int, hash_buckets: int) -> np.ndarray:
    """Unigram ids, then bigram ids hashed into ``hash_buckets`` slots after them."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if hash_buckets == 0 or len(tokens) < 2:
        return tokens
    pairs = tokens[:-1].astype(np.uint64) * np.uint64(vocab_size) + tokens[1:].astype(np.uint64)
    with np.errstate(over="ignore"):  # the hash wraps around 2^64 by design
        hashed = (pairs * _HASH_MULTIPLIER) >> np.uint64(40)
    return np.concatenate([tokens, vocab_size + (hashed % np.uint64(hash_buckets)).astype(np.int64)])


class BagOfTokens(nn.Module):
    """Logistic regression on the mean feature embedding: logit(P(positive | tokens))."""

    def __init__(self, vocab_size: int, hash_buckets: int) -> None:
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.hash_buckets = int(hash_buckets)
        self.weights = nn.EmbeddingBag(self.vocab_size + self.hash_buckets, 1, mode="mean")
        nn.init.zeros_(self.weights.weight)
        self.bias = nn.Parameter(torch.zeros(1))

    def _bags(self, sequences: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [feature_ids(s, self.vocab_size, self.hash_buckets) for s in sequences]
        # An empty text gets the padding-free zero vector: its logit is the bias alone.
        feats = [f if len(f) else np.zeros(0, dtype=np.int64) for f in feats]
        offsets = np.cumsum([0] + [len(f) for f in feats[:-1]])
        flat = np.concatenate(feats) if feats else np.zeros(0, dtype=np.int64)
        return torch.as_tensor(flat), torch.as_tensor(offsets, dtype=torch.int64)

    def logits(self, sequences: Sequence[np.ndarray]) -> torch.Tensor:
        flat, offsets = self._bags(sequences)
        return self.weights(flat, offsets).squeeze(-1) + self.bias

    @torch.no_grad()
    def positive_probability(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        if not sequences:
            return np.zeros(0)
        return torch.sigmoid(self.logits(sequences)).numpy().astype(np.float64)

    def fit_labels(
        self, sequences: Sequence[np.ndarray], labels: np.ndarray, *, epochs: int, lr: float,
        weight_decay: float, seed: int, batch_size: int = 64,
    ) -> dict[str, float]:
        """Fit on labelled reviews (1 positive, 0 negative); returns the last epoch's loss and accuracy."""
        y = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        return self._fit(
            len(sequences), lambda idx: nn.functional.binary_cross_entropy_with_logits(
                self.logits([sequences[i] for i in idx]), y[idx]),
            lambda: float(((self.positive_probability(sequences) > 0.5) == (y.numpy() > 0.5)).mean()),
            epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed, batch_size=batch_size,
        )

    def fit_preferences(
        self, winners: Sequence[np.ndarray], losers: Sequence[np.ndarray], *, epochs: int, lr: float,
        weight_decay: float, seed: int, batch_size: int = 64,
    ) -> dict[str, float]:
        """Bradley–Terry: P(winner ≻ loser) = σ(r(winner) − r(loser)), with r the logit."""

        def loss(idx: np.ndarray) -> torch.Tensor:
            margin = self.logits([winners[i] for i in idx]) - self.logits([losers[i] for i in idx])
            return nn.functional.softplus(-margin).mean()

        def accuracy() -> float:
            with torch.no_grad():
                return float((self.logits(winners) > self.logits(losers)).float().mean())

        return self._fit(len(winners), loss, accuracy, epochs=epochs, lr=lr, weight_decay=weight_decay,
                         seed=seed, batch_size=batch_size)

    def _fit(self, n: int, loss_of: Any, accuracy: Any, *, epochs: int, lr: float, weight_decay: float,
             seed: int, batch_size: int) -> dict[str, float]:
        if n == 0:
            return {"loss": float("nan"), "accuracy": float("nan")}
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        rng = np.random.default_rng(seed)
        last = float("nan")
        for _ in range(epochs):
            total = 0.0
            order = rng.permutation(n)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                loss = loss_of(idx)
                # Only the rows in the batch get the penalty: the embedding is sparse in effect.
                loss = loss + weight_decay * (self.weights.weight ** 2).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            last = total / n
        return {"loss": last, "accuracy": accuracy()}

    def state(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "hash_buckets": self.hash_buckets,
                "state": {k: v.detach().clone() for k, v in self.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BagOfTokens:
        model = cls(int(state["vocab_size"]), int(state["hash_buckets"]))
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state["state"].items()})
        return model


def load_classifier(name: str, field: str = "lm.sentiment.pretrained") -> tuple[Any, Any]:
    """A Hugging Face sequence classifier and its tokenizer, from a folder or the local cache
    only; anything else (missing, damaged, not a classifier) is one line naming ``field``."""
    from transformers import AutoModelForSequenceClassification

    from fedrlhf_ray.tasks.text.lm import load_local_hf

    return load_local_hf(
        name, field, AutoModelForSequenceClassification, "a sequence classifier",
        f"leave {field} unset to train one per client",
    )


class HFSentiment:
    """A Hugging Face sequence classifier over decoded text (the paper's sentiment scorer)."""

    def __init__(self, name: str, decode: Any, field: str = "lm.sentiment.pretrained") -> None:
        self.tokenizer, self.model = load_classifier(name, field)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device).eval()
        self.decode = decode
        labels = {str(v).lower(): int(k) for k, v in (self.model.config.id2label or {}).items()}
        self.positive = next((i for name_, i in labels.items() if name_.startswith("pos")), 1)

    @torch.no_grad()
    def positive_probability(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        if not sequences:
            return np.zeros(0)
        texts = [self.decode(s) for s in sequences]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=512)
        probs = torch.softmax(self.model(**batch.to(self.device)).logits.float(), dim=-1)
        return probs[:, self.positive].cpu().numpy().astype(np.float64)
