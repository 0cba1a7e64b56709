"""Local RLHF on IMDb: the client's sentiment reward model → PPO of the LM policy on
λ_k·sentiment + (1 − λ_k)·fluency, with β·KL to the frozen reference.

:class:`TextRLHFTrainer` is the :class:`~fedrlhf_ray.local_trainer.LocalTrainer` of the IMDb task:
the same engine (client actors, client store, strategies, secure aggregation, DP) drives it as the
MovieLens one. A client's record holds its reward model, its comparisons (under 'preferences'), its
KL coefficient β and its optimizer state; its reviews, labels and reward model never leave it. The
shared weights are the full LM and the value head.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.data.imdb import ImdbShard
from fedrlhf_ray import rllib_edge
from fedrlhf_ray.local_trainer import Weights
from fedrlhf_ray.rllib_edge import RLlibLocalTrainer, seed_global_rngs
from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.seeding import derive_seed
from fedrlhf_ray.tasks.text import ppo as text_ppo
from fedrlhf_ray.tasks.text.generation import generate, text_metrics
from fedrlhf_ray.tasks.text.judges import DecodedJudge, LexiconJudge
from fedrlhf_ray.tasks.text.lm import LanguageModel, continuation_logprobs
from fedrlhf_ray.tasks.text.reward import ContinuationScorer
from fedrlhf_ray.tasks.text.sentiment import BagOfTokens, HFSentiment


@dataclass(frozen=True)
class TextClient:
    """One client's private data, tokenized: labelled reviews, training prompts (the openings of
    its reviews) and held-out prompts and reviews (from its shard of the test split)."""

    client_id: int
    reviews: list[np.ndarray]
    labels: np.ndarray
    prompts: list[np.ndarray]
    prompt_lambdas: np.ndarray | None  # one λ per prompt (pooled client), else None
    test_prompts: list[np.ndarray]
    test_reviews: list[np.ndarray]
    test_labels: np.ndarray


def lm_source(cfg: ExperimentConfig) -> tuple[str, str]:
    pretrained = cfg.language_model().pretrained
    if pretrained is not None:
        return ("pretrained", pretrained)
    from fedrlhf_ray.tasks.text.prepare import prepared_folder

    return ("prepared", str(prepared_folder(cfg)))


def _openings(seqs: Sequence[np.ndarray], length: int) -> list[np.ndarray]:
    # Reviews no longer than the prompt leave nothing to continue; they only give no prompt.
    return [s[:length] for s in seqs if len(s) > length]


def tokenize_shard(cfg: ExperimentConfig, lm: LanguageModel, shard: ImdbShard) -> TextClient:
    sent, p = cfg.language_model().sentiment, cfg.imdb().prompt_tokens
    reviews = lm.encode([r.text for r in shard.train], sent.max_review_tokens)
    test = lm.encode([r.text for r in shard.test], sent.max_review_tokens)
    return TextClient(
        shard.client_id, reviews, np.array([r.label for r in shard.train], dtype=np.int64), _openings(reviews, p),
        None, _openings(test, p), test, np.array([r.label for r in shard.test], dtype=np.int64),
    )


def pool_text_clients(clients: Sequence[TextClient], lambdas: Sequence[float], client_id: int) -> TextClient:
    """All clients as one (the centralized baseline): each prompt keeps its own client's λ."""
    return TextClient(
        client_id,
        [r for c in clients for r in c.reviews],
        np.concatenate([c.labels for c in clients]),
        [q for c in clients for q in c.prompts],
        np.concatenate([[lam] * len(c.prompts) for c, lam in zip(clients, lambdas, strict=True)]),
        [q for c in clients for q in c.test_prompts],
        [r for c in clients for r in c.test_reviews],
        np.concatenate([c.test_labels for c in clients]),
    )


def _pad(seqs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Variable-length token lists as one padded array and their lengths (a record holds arrays)."""
    width = max((len(s) for s in seqs), default=0)
    tokens = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return {"tokens": tokens, "lengths": np.array([len(s) for s in seqs], dtype=np.int64)}


def _unpad(stored: dict[str, Any]) -> list[np.ndarray]:
    tokens, lengths = np.asarray(stored["tokens"]), np.asarray(stored["lengths"])
    return [tokens[i, : int(n)].copy() for i, n in enumerate(lengths)]


def adapt_kl_coeff(beta: float, observed_kl: float, target: float, horizon: float) -> float:
    """Ziegler et al.'s proportional controller: β ← β·(1 + clip(KL/target − 1, ±0.2)/horizon)."""
    if not np.isfinite(observed_kl):
        return beta
    error = float(np.clip(observed_kl / target - 1.0, -0.2, 0.2))
    return beta * (1.0 + error / horizon)


class TextRLHFTrainer(RLlibLocalTrainer):
    """Local RLHF on IMDb for the virtual clients ``clients``; ``lambdas[i]`` is client i's λ."""

    def __init__(
        self, cfg: ExperimentConfig, clients: Sequence[TextClient], lambdas: Sequence[float],
        budget_scale: dict[int, int] | None = None,
    ) -> None:
        from fedrlhf_ray.tasks.text.policy import cached_lm

        self.cfg = cfg
        self.clients = {c.client_id: c for c in clients}
        self.lambdas = {c.client_id: float(lam) for c, lam in zip(clients, lambdas, strict=True)}
        self.budget_scale = budget_scale or {}
        self.source = lm_source(cfg)
        self.lm: LanguageModel = cached_lm(self.source)
        self.judge = _independent_judge(cfg, self.lm)
        self.judge_lm = _judge_lm(cfg)
        self.lexicon = LexiconJudge(self.lm.decode)
        sent = cfg.language_model().sentiment
        self.shared_scorer = HFSentiment(sent.pretrained, self.lm.decode) if sent.pretrained is not None else None
        self._built(
            text_ppo.build_text_ppo(cfg, self.source, self.lm.vocab_size, self.lm.eos_id, derive_seed(cfg.seed, "ppo")),
            cfg.seed,
        )
        # The simulated humans of 'preferences': a function of the client's data alone, so they
        # are rebuilt, not stored.
        self._humans: dict[int, BagOfTokens] = {}
        self.client: TextClient | None = None

    @property
    def loaded(self) -> TextClient:
        assert self.client is not None, "no client loaded: call load_client first"
        return self.client

    # -- reward models -------------------------------------------------------------------------
    def _labelled_model(self, client: TextClient, purpose: str) -> BagOfTokens:
        sent = self.cfg.language_model().sentiment
        model = BagOfTokens(self.lm.vocab_size, sent.hash_buckets)
        model.fit_labels(
            client.reviews, client.labels, epochs=sent.epochs, lr=sent.lr, weight_decay=sent.weight_decay,
            seed=derive_seed(self.cfg.seed, purpose, client.client_id),
        )
        return model

    def _human(self, client: TextClient) -> BagOfTokens:
        """The client's simulated human under 'preferences': its taste is a model of its own reviews."""
        if client.client_id not in self._humans:
            self._humans[client.client_id] = self._labelled_model(client, "human")
        return self._humans[client.client_id]

    def _scorer(self) -> ContinuationScorer:
        sentiment = self.shared_scorer if self.shared_scorer is not None else self.reward_model
        return ContinuationScorer(sentiment, self.lm.model, self.lm.vocab_size)

    # -- swapping virtual clients --------------------------------------------------------------
    def load_client(self, client_id: int, state: dict[str, Any] | None) -> None:
        client = self.clients[client_id]
        self.client = client
        sent = self.cfg.language_model().sentiment
        self.winners: list[np.ndarray] = []
        self.losers: list[np.ndarray] = []
        if state is None:
            self.reward_model = (
                self._labelled_model(client, "reward_model") if sent.feedback == "labels"
                else BagOfTokens(self.lm.vocab_size, sent.hash_buckets)
            )
            self.kl_coeff = self.cfg.language_model().kl_coeff
            self._load_optimizer(None)
        else:
            self.reward_model = BagOfTokens.from_state(state["reward_model"])
            self.kl_coeff = float(state["kl_coeff"])
            if "preferences" in state:
                self.winners = _unpad(state["preferences"]["winners"])
                self.losers = _unpad(state["preferences"]["losers"])
            self._load_optimizer(state["optimizer"])
        self.scorer = self._scorer()
        lam = client.prompt_lambdas if client.prompt_lambdas is not None else self.lambdas[client_id]
        text_ppo.set_client(self.algo, client.prompts, lam, self.scorer, derive_seed(self.cfg.seed, "env", client_id))

    def save_client(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "reward_model": self.reward_model.state(),
            "kl_coeff": float(self.kl_coeff),
            "optimizer": self._optimizer_state(),
        }
        if self.cfg.language_model().sentiment.feedback == "preferences":
            record["preferences"] = {"winners": _pad(self.winners), "losers": _pad(self.losers)}
        return record

    # -- a local round -------------------------------------------------------------------------
    def _begin(self, round_index: int, purpose: str) -> None:
        cid = self.loaded.client_id
        seed_global_rngs(derive_seed(self.cfg.seed, purpose, round_index, cid))
        lam = self.loaded.prompt_lambdas if self.loaded.prompt_lambdas is not None else self.lambdas[cid]
        seed = derive_seed(self.cfg.seed, "env", purpose, round_index, cid)
        text_ppo.set_client(self.algo, self.loaded.prompts, lam, self.scorer, seed)

    def _ask_preferences(self, round_index: int) -> dict[str, float]:
        """This round's comparisons: two continuations of each of some of the client's prompts,
        the simulated human's Bradley–Terry answers, then the reward model refitted on all of them."""
        sent, client = self.cfg.language_model().sentiment, self.loaded
        rng = np.random.default_rng(derive_seed(self.cfg.seed, "queries", round_index, client.client_id))
        picks = rng.choice(len(client.prompts), size=min(sent.preference_pairs, len(client.prompts)), replace=False)
        prompts = [client.prompts[i] for i in picks]
        module = text_ppo.acting_module(self.algo)
        imdb = self.cfg.imdb()
        seed = derive_seed(self.cfg.seed, "pairs", round_index, client.client_id)
        first, second = (
            generate(module.lm, module.reference, prompts, max_tokens=imdb.generate_tokens, eos_id=self.lm.eos_id,
                     temperature=1.0, seed=seed + k).continuations
            for k in (0, 1)
        )
        human = self._human(client)
        margin = sent.beta * (human.logits(first) - human.logits(second)).detach().numpy()
        first_wins = rng.random(len(first)) < 1.0 / (1.0 + np.exp(-margin))
        self.winners += [a if w else b for a, b, w in zip(first, second, first_wins, strict=True)]
        self.losers += [b if w else a for a, b, w in zip(first, second, first_wins, strict=True)]
        self.reward_model = BagOfTokens(self.lm.vocab_size, sent.hash_buckets)
        fit = self.reward_model.fit_preferences(
            self.winners, self.losers, epochs=sent.epochs, lr=sent.lr, weight_decay=sent.weight_decay,
            seed=derive_seed(self.cfg.seed, "reward_model", round_index, client.client_id),
        )
        self.scorer = self._scorer()
        return {"feedback/total_pairs": float(len(self.winners)), "reward_model/train_pair_accuracy": fit["accuracy"]}

    def train(self, round_index: int, anchor: Weights | None = None, proximal_mu: float = 0.0
              ) -> tuple[int, dict[str, float]]:
        start = time.perf_counter()
        cid = self.loaded.client_id
        metrics: dict[str, float] = {}
        if self.cfg.language_model().sentiment.feedback == "preferences":
            metrics.update(self._ask_preferences(round_index))
        self._begin(round_index, "train")
        rllib_edge.set_prox_anchor(self.algo, anchor, proximal_mu)
        text_ppo.set_kl_coeff(self.algo, self.kl_coeff)
        iterations = self.cfg.ppo.local_iterations * self.budget_scale.get(cid, 1)
        steps, ppo_metrics = text_ppo.train_iterations(self.algo, iterations)
        rllib_edge.set_prox_anchor(self.algo, None)
        metrics.update({f"train/{k}": v for k, v in ppo_metrics.items()})
        metrics.update({f"train/{k}": v for k, v in self.scorer.drain().items()})
        metrics["train/kl_coeff"] = self.kl_coeff
        lm = self.cfg.language_model()
        if lm.adaptive_kl:
            # The learner reports KL per generated token; the target is per sequence.
            per_token = ppo_metrics.get("kl_to_reference_per_token", float("nan"))
            per_sequence = per_token * self.cfg.imdb().generate_tokens
            self.kl_coeff = adapt_kl_coeff(self.kl_coeff, per_sequence, lm.target_kl, lm.kl_horizon)
        metrics["train/env_steps"] = float(steps)
        metrics["train/seconds"] = time.perf_counter() - start
        return steps, metrics

    def finetune(self, round_index: int, iterations: int) -> None:
        if iterations > 0:
            self._begin(round_index, "finetune")
            text_ppo.set_kl_coeff(self.algo, self.kl_coeff)
            text_ppo.train_iterations(self.algo, iterations)
            self.scorer.drain()

    def evaluate(self, round_index: int = 0) -> dict[str, float]:
        """Generations for the client's held-out prompts (the same samples' seed every round)."""
        client, imdb = self.loaded, self.cfg.imdb()
        module = text_ppo.acting_module(self.algo)
        module.eval()
        gens = generate(
            module.lm, module.reference, client.test_prompts, max_tokens=imdb.generate_tokens,
            eos_id=self.lm.eos_id, temperature=self.cfg.language_model().eval_temperature,
            seed=derive_seed(self.cfg.seed, "eval", client.client_id),
        )
        module.train()
        own = self.scorer.sentiment.positive_probability(gens.continuations)
        independent = self.judge.positive_probability(gens.continuations)
        lexicon = self.lexicon.positive_probability(gens.continuations)
        pooled = client.prompt_lambdas
        lam = float(np.mean(pooled)) if pooled is not None else self.lambdas[client.client_id]
        judged = None if self.judge_lm is None else [
            continuation_logprobs(self.judge_lm, prompt, [c])[0]
            for prompt, c in zip(client.test_prompts, gens.continuations, strict=True)
        ]
        out = text_metrics(gens, own, independent, lexicon, lam, self.lm.vocab_size, judged)
        if self.shared_scorer is None and (self.cfg.language_model().sentiment.feedback == "labels" or self.winners):
            predicted = self.reward_model.positive_probability(client.test_reviews) > 0.5
            out["reward_model_accuracy"] = float((predicted == (client.test_labels == 1)).mean())
        return {f"eval/{k}": v for k, v in out.items()}

    def samples(self, round_index: int) -> str:
        """The loaded client's own model continues the public prompts."""
        from fedrlhf_ray.tasks.text.samples import public_samples

        module = text_ppo.acting_module(self.algo)
        module.eval()
        text = public_samples(self.cfg, self.lm, module.lm, module.reference,
                              f"client {self.loaded.client_id}'s own model", round_index)
        module.train()
        return text


def _judge_lm(cfg: ExperimentConfig) -> Any:
    from fedrlhf_ray.tasks.text.prepare import load_judge_lm, prepared_folder

    return load_judge_lm(prepared_folder(cfg))


def _independent_judge(cfg: ExperimentConfig, lm: LanguageModel) -> DecodedJudge:
    from fedrlhf_ray.tasks.text.prepare import JUDGE, load_judge, prepared_folder

    return DecodedJudge(load_judge(prepared_folder(cfg) / JUDGE), lm.decode)


def build_text_clients(cfg: ExperimentConfig, lm: LanguageModel) -> list[TextClient]:
    from fedrlhf_ray.tasks.text.clients import build_imdb_shards

    return [tokenize_shard(cfg, lm, s) for s in build_imdb_shards(cfg)]


def build_host_trainer(cfg: ExperimentConfig, host_index: int, num_hosts: int) -> TextRLHFTrainer:
    """Inside client actor ``host_index`` of ``num_hosts``: the IMDb trainer of its clients; the
    host of the centralized baseline's pooled client (id K) also gets everyone's data, with the
    iterations of the clients sampled per round."""
    from fedrlhf_ray.tasks import hosted_clients
    from fedrlhf_ray.tasks.text.policy import cached_lm

    clients = build_text_clients(cfg, cached_lm(lm_source(cfg)))
    lambdas = cfg.client_lambdas()
    mine, pooled = hosted_clients(clients, host_index, num_hosts, cfg.federation.baseline == "centralized")
    lams = [lambdas[c.client_id] for c in mine]
    scale: dict[int, int] = {}
    if pooled:
        k = len(clients)
        mine.append(pool_text_clients(clients, lambdas, k))
        lams.append(float(np.mean(lambdas)))
        scale[k] = cfg.clients_per_round_count(k)
    return TextRLHFTrainer(cfg, mine, lams, budget_scale=scale)
