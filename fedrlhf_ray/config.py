"""Typed experiment configuration: one YAML file = one experiment.

Every field has a description (the README's configuration reference is generated from the
same text) and is validated before anything runs. Errors are reported in one line that names
the field, the bad value and what is allowed, e.g.::

    federation.rounds: got 0 — must be >= 1

Integer fields take numbers only (3 or 3.0, not ``true`` or ``"3"``), float fields finite
numbers only (no ``.nan``/``.inf``), and a YAML key may not repeat. Whether the machine can
host the local Ray is :func:`check_machine`'s question, asked only when one is started here.
"""

from __future__ import annotations

import codecs
import copy
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fedrlhf_ray.errors import ConfigError
from fedrlhf_ray.strategies import STRATEGY_NAMES

DatasetName = Literal["ml-latest-small", "ml-100k", "ml-1m", "ml-25m"]
DATASETS: tuple[str, ...] = get_args(DatasetName)


def _whole_number(value: Any) -> Any:
    # Lax pydantic turns true/false and "3" into integers; in a config they are mistakes (a
    # flag in the wrong place, a quoted number). 3.0 passes: it is the number 3.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PydanticCustomError(
            "whole_number", "must be an integer such as 3 (or 3.0), not true/false or a quoted string"
        )
    return value


def _number(value: Any) -> Any:
    # Strings stay accepted: PyYAML (YAML 1.1) reads 1e-3 as the string "1e-3".
    if isinstance(value, bool):
        raise PydanticCustomError("number", "must be a number such as 0.5, not true/false")
    return value


Int = Annotated[int, BeforeValidator(_whole_number)]
Float = Annotated[float, BeforeValidator(_number)]


class _Section(BaseModel):
    # allow_inf_nan=False refuses .nan/.inf (and "nan", "inf" strings) in every float field,
    # list items included: a NaN learning rate or λ would only show up as NaN metrics.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)


class SyntheticConfig(_Section):
    """The synthetic world (used when ``env.name`` is ``synthetic``)."""

    n_items: Int = Field(300, ge=20, description="Items in the catalogue.")
    latent_dim: Int = Field(8, ge=1, description="Dimension of user and item taste vectors.")
    n_clusters: Int = Field(
        4, ge=1, description="Preference clusters; each client has a home cluster, assigned round-robin."
    )
    home_cluster_prob: Float = Field(
        0.5, ge=0.0, le=1.0,
        description="Probability that a user comes from the client's home cluster (else a random cluster); "
        "1 = clients with a single taste.",
    )
    heterogeneity: Float = Field(
        0.7, ge=0.0, le=1.0,
        description="0: all clients share one taste distribution; 1: clusters are unrelated.",
    )
    feature_noise: Float = Field(0.1, ge=0.0, description="Noise on the observed item features.")
    items_per_user: Int = Field(60, ge=4, description="Items each user watched (their interactions).")
    popularity_weight: Float = Field(
        1.5, ge=0.0, description="How much popularity drives what users watch (engagement)."
    )
    taste_weight: Float = Field(
        0.2, ge=0.0,
        description="How much personal taste drives what users watch; low values make engagement and taste "
        "disagree, so human feedback matters.",
    )


class DataConfig(_Section):
    """MovieLens data (used when ``env.name`` is ``movielens``)."""

    dataset: DatasetName = Field("ml-latest-small", description="MovieLens release.")
    path: str | None = Field(
        None, min_length=1, description="Extracted folder or official zip; default: the cache directory."
    )
    cache_dir: str | None = Field(
        None, min_length=1, description="Cache directory (default $FEDRLHF_CACHE or ~/.cache/fedrlhf)."
    )
    download: bool = Field(False, description="Download the official archive if no copy is found.")
    min_ratings: Int = Field(20, ge=2, description="Users with fewer ratings are not eligible as clients.")


class ImdbConfig(_Section):
    """IMDb reviews and the text env (used when ``env.name`` is ``imdb``)."""

    path: str | None = Field(
        None, min_length=1,
        description="aclImdb folder, the official aclImdb_v1.tar.gz, or a folder of part archives; "
        "default: the cache directory.",
    )
    cache_dir: str | None = Field(
        None, min_length=1, description="Cache directory (default $FEDRLHF_CACHE or ~/.cache/fedrlhf)."
    )
    download: bool = Field(False, description="Download the official archive if no copy is found.")
    label_skew: Float = Field(
        0.0, ge=0.0, le=1.0,
        description="Heterogeneity: client k's share of positive reviews runs linearly from 0.5 − s/2 "
        "(first client) to 0.5 + s/2 (last); 0 = IID, 1 = first client all negative, last all positive.",
    )
    reviews_per_client: Int = Field(
        1000, ge=20, description="Labelled training reviews per client (its private human feedback)."
    )
    test_prompts_per_client: Int = Field(
        32, ge=1, description="Held-out prompts per client, from its own shard of the IMDb test split."
    )
    prompt_tokens: Int = Field(8, ge=1, le=256, description="Prompt length in tokens (the paper cuts to 8).")
    generate_tokens: Int = Field(
        16, ge=1, le=256, description="G: tokens generated per episode (the paper: 32); end-of-text ends it early."
    )


class SentimentConfig(_Section):
    """Each client's sentiment reward model and the independent evaluator (IMDb)."""

    pretrained: str | None = Field(
        None, min_length=1,
        description="A Hugging Face sequence classifier (folder, or name in the local Hugging Face cache, "
        "e.g. lvwerra/distilbert-imdb) used as every client's scorer instead of training one; never downloaded.",
    )
    feedback: Literal["labels", "preferences"] = Field(
        "labels",
        description="'labels': fit on the client's labelled reviews; 'preferences': fit by Bradley–Terry on "
        "a simulated human's comparisons of pairs of the policy's continuations (the human's taste is a "
        "model of the client's labelled reviews).",
    )
    preference_pairs: Int = Field(
        64, ge=1, description="'preferences': comparisons the client's human answers per round."
    )
    beta: Float = Field(4.0, ge=0.0, description="'preferences': Bradley–Terry rationality of the simulated human.")
    hash_buckets: Int = Field(
        2**18, ge=0, description="Hashed token-bigram features added to the token unigrams (0: unigrams only)."
    )
    epochs: Int = Field(4, ge=1, description="Epochs of Adam over the client's reviews (or comparisons).")
    lr: Float = Field(0.1, gt=0.0, description="Adam learning rate.")
    weight_decay: Float = Field(0.0, ge=0.0, description="L2 penalty on the weights.")
    max_review_tokens: Int = Field(256, ge=8, description="Reviews are cut to this many tokens for training.")


class LMConfig(_Section):
    """The language-model policy and its frozen reference (IMDb); see ``fedrlhf prepare imdb``."""

    pretrained: str | None = Field(
        None, min_length=1,
        description="A Hugging Face causal LM (folder, or name in the local Hugging Face cache, e.g. gpt2) "
        "as policy initialisation and reference; never downloaded. Default: the small GPT-2 "
        "`fedrlhf prepare imdb` pre-trains.",
    )
    vocab_size: Int = Field(4096, ge=300, le=65536, description="Byte-level BPE vocabulary size (prepare).")
    n_layer: Int = Field(2, ge=1, le=48, description="Transformer blocks (prepare).")
    n_embd: Int = Field(64, ge=8, le=4096, description="Hidden size (prepare); a multiple of n_head.")
    n_head: Int = Field(2, ge=1, le=64, description="Attention heads (prepare).")
    context: Int = Field(64, ge=16, le=2048, description="Context length in tokens (prepare and the text env).")
    corpus: Literal["train+unsup", "unsup"] = Field(
        "train+unsup",
        description="Pre-training text: IMDb train + unlabelled reviews (the issue's setting), or only the "
        "unlabelled ones (so no client's review text is in the public model).",
    )
    max_texts: Int = Field(0, ge=0, description="Use at most this many reviews for prepare (0: all).")
    pretrain_steps: Int = Field(4000, ge=1, description="Optimizer steps of pre-training.")
    pretrain_batch_size: Int = Field(32, ge=1, description="Sequences per pre-training step.")
    pretrain_lr: Float = Field(3e-3, gt=0.0, description="Peak AdamW learning rate (cosine decay).")
    pretrain_seed: Int = Field(
        0, ge=0, description="Seed of prepare: the public model is the same whatever the experiment's seed."
    )
    kl_coeff: Float = Field(0.05, ge=0.0, description="β of the KL(π ‖ π_ref) penalty in PPO's loss.")
    adaptive_kl: bool = Field(
        False, description="Adapt β per client towards target_kl (Ziegler et al.); β is kept in the client's record."
    )
    target_kl: Float = Field(2.0, gt=0.0, description="Adaptive KL: target KL per generated sequence (nats).")
    kl_horizon: Float = Field(
        10.0, gt=0.0, description="Adaptive KL: rounds over which β moves by the (clipped) relative error."
    )
    eval_temperature: Float = Field(1.0, gt=0.0, description="Sampling temperature of evaluation generations.")
    sentiment: SentimentConfig = Field(default_factory=SentimentConfig)


class EnvConfig(_Section):
    """The environment: slate recommendation (synthetic, MovieLens) or IMDb text continuation."""

    name: Literal["synthetic", "movielens", "imdb"] = Field("synthetic", description="Which environment.")
    slate_size: Int = Field(10, ge=2, le=100, description="Candidates shown per step (M).")
    session_length: Int = Field(10, ge=1, le=1000, description="Steps per episode (one session).")
    history_length: Int = Field(10, ge=1, le=200, description="Recent training items in the observation.")
    positives_per_slate: Int = Field(3, ge=0, description="Watched items among the M candidates.")
    heldout_fraction: Float = Field(
        0.2, gt=0.0, lt=1.0, description="Latest fraction of each user's interactions held out for evaluation."
    )
    # Every environment rates on a scale up to 5: a higher threshold would like nothing.
    like_threshold: Float = Field(4.0, gt=0.0, le=5.0, description="A rating at or above this is 'liked'.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    imdb: ImdbConfig = Field(default_factory=ImdbConfig)

    @model_validator(mode="after")
    def _positives_fit_slate(self) -> EnvConfig:
        if self.positives_per_slate > self.slate_size:
            raise ValueError(
                f"positives_per_slate ({self.positives_per_slate}) must be <= slate_size ({self.slate_size})"
            )
        return self


class ClientsConfig(_Section):
    """How clients are formed."""

    num_clients: Int = Field(5, ge=1, description="K, the number of clients.")
    formation: Literal["user", "group"] = Field(
        "user", description="'user': one user per client (paper); 'group': several users per client (cross-silo)."
    )
    users_per_client: Int = Field(1, ge=1, description="Users per client when formation is 'group'.")
    grouping: Literal["random", "taste"] = Field(
        "random", description="Group users at random or by taste (more heterogeneous clients)."
    )


class FeedbackConfig(_Section):
    """The simulated human of each client."""

    kind: Literal["pairwise", "rating", "both"] = Field(
        "pairwise", description="Pairwise comparisons, direct noisy ratings, or half of each."
    )
    beta: Float = Field(2.0, ge=0.0, description="Bradley–Terry rationality β (0 = random answers).")
    rating_noise: Float = Field(0.5, ge=0.0, description="Std of the noise on direct ratings.")
    budget_per_round: Int = Field(100, ge=1, description="Queries a client may ask per round.")
    query_strategy: Literal["random", "uncertainty"] = Field(
        "random", description="How queries are chosen; 'uncertainty' asks where the reward model is least sure."
    )
    pool_factor: Int = Field(
        5, ge=1, description="Candidate pool size for active queries, as a multiple of the budget."
    )


class RewardModelConfig(_Section):
    """The client-local reward model H_k."""

    hidden: Int = Field(32, ge=1, description="Hidden units.")
    embedding_dim: Int = Field(0, ge=0, description="Learned item embedding size (0 = features only).")
    lr: Float = Field(3e-3, gt=0.0, description="Adam learning rate.")
    weight_decay: Float = Field(1e-4, ge=0.0, description="Adam weight decay.")
    epochs: Int = Field(10, ge=1, description="Epochs over all accumulated feedback per fit.")
    batch_size: Int = Field(64, ge=1, description="Mini-batch size.")


class LambdaSpread(_Section):
    """λ_k spread linearly over clients, as in the paper (0.1 → 0.9)."""

    low: Float = Field(0.1, ge=0.0, description="λ of the first client.")
    high: Float = Field(0.9, ge=0.0, description="λ of the last client.")


def _lambda_form(value: Any) -> str:
    if isinstance(value, dict | LambdaSpread):
        return "spread"
    return "list" if isinstance(value, list) else "scalar"


# Tags of λ's forms; they appear in error locations and are left out of the field names.
_LAMBDA_FORMS = ("scalar", "list", "spread")


class ShapingConfig(_Section):
    """Reward shaping R = R⁰ + λ·H."""

    lam: Annotated[
        Annotated[Float, Tag("scalar")]
        | Annotated[list[Annotated[Float, Field(ge=0.0)]], Tag("list")]
        | Annotated[LambdaSpread, Tag("spread")],
        Discriminator(_lambda_form),
    ] = Field(
        1.0, alias="lambda",
        description="λ: one value for all clients, a list with one value per client, or {low, high} spread.",
    )

    @model_validator(mode="after")
    def _non_negative(self) -> ShapingConfig:
        if isinstance(self.lam, float) and self.lam < 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam}")
        return self


class PPOSettings(_Section):
    """RLlib PPO settings used by every client."""

    lr: Float = Field(1e-3, gt=0.0, description="Learning rate.")
    gamma: Float = Field(0.0, ge=0.0, le=1.0, description="Discount (0: picks in a session are independent).")
    lambda_gae: Float = Field(0.95, ge=0.0, le=1.0, description="GAE λ.")
    clip_param: Float = Field(0.2, gt=0.0, description="PPO clip.")
    entropy_coeff: Float = Field(0.01, ge=0.0, description="Entropy bonus.")
    vf_loss_coeff: Float = Field(0.5, ge=0.0, description="Value loss weight.")
    train_batch_size: Int = Field(1000, ge=16, description="Env steps per PPO iteration.")
    minibatch_size: Int = Field(250, ge=8, description="SGD mini-batch size.")
    num_epochs: Int = Field(4, ge=1, description="SGD epochs per iteration.")
    local_iterations: Int = Field(3, ge=1, description="E: PPO iterations per client per round.")
    hidden: Int = Field(64, ge=4, description="Hidden units of the slate scorer.")
    embedding_dim: Int = Field(16, ge=0, description="Learned item embedding size (0 = features only).")
    num_envs: Int = Field(8, ge=1, description="Vectorised envs per client (batches the policy's forward passes).")

    @model_validator(mode="after")
    def _minibatch_fits(self) -> PPOSettings:
        if self.minibatch_size > self.train_batch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must be <= train_batch_size ({self.train_batch_size})"
            )
        return self


class FederationConfig(_Section):
    """The federated round loop."""

    rounds: Int = Field(5, ge=1, description="Federated rounds T.")
    clients_per_round: Float = Field(
        1.0, gt=0.0,
        description="Clients sampled per round: a fraction if <= 1.0, a count if an integer > 1.",
    )
    strategy: Literal[STRATEGY_NAMES] = Field(  # type: ignore[valid-type]  # the registry's names
        "fedavg", description="Aggregation strategy."
    )
    fedprox_mu: Float = Field(0.01, ge=0.0, description="FedProx proximal term μ.")
    trim_fraction: Float = Field(0.1, ge=0.0, lt=0.5, description="Fraction trimmed at each end (trimmed_mean).")
    krum_byzantine: Int = Field(
        1, ge=0,
        description="Byzantine clients f that krum / multi_krum tolerate (a round needs more than 2f + 2 updates).",
    )
    multi_krum_selected: Int = Field(
        2, ge=1, description="Updates multi_krum averages: the ones with the lowest Krum scores (at most n - f)."
    )
    norm_bound: Float = Field(
        1.0, gt=0.0, description="L2 bound on each client's change of the model under norm_bound."
    )
    sparse_rows: bool = Field(
        True,
        description="Average item-embedding rows over the clients that changed them (false: over all, "
        "densely, as secure aggregation and DP must).",
    )
    personalization: Literal["none", "finetune", "personal_head"] = Field(
        "none", description="How clients personalise the global model before evaluation."
    )
    finetune_iterations: Int = Field(1, ge=0, description="Local PPO iterations for 'finetune'.")
    personal_layers: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["scorer.score_head."],
        description="Parameter-name prefixes that never leave a client under 'personal_head' (FedPer).",
    )
    baseline: Literal["federated", "centralized", "local"] = Field(
        "federated", description="Federated RLHF, or the centralized / local-only baseline on the same data."
    )
    straggler_timeout_s: Float | None = Field(None, gt=0.0, description="Drop clients slower than this (seconds).")
    min_results: Int = Field(1, ge=1, description="Fewest client results a round needs to aggregate.")
    client_state_dir: str | None = Field(
        None, min_length=1,
        description="Where client actors keep their clients' private records (one folder per client): "
        "default `<run dir>/clients/`; on a cluster, a path on storage every node shares, or a "
        "node-local path when each client actor stays on its node. The driver never reads it.",
    )

    @model_validator(mode="after")
    def _count_is_integral(self) -> FederationConfig:
        if self.clients_per_round > 1.0 and not float(self.clients_per_round).is_integer():
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) must be a fraction <= 1 or a whole count"
            )
        return self


ATTACK_KINDS = ("none", "sign_flip", "scale", "gaussian", "nan", "flipped_feedback")


class AttackConfig(_Section):
    """Byzantine clients, simulated inside their own client actors (for robustness studies)."""

    kind: Literal[ATTACK_KINDS] = Field(  # type: ignore[valid-type]
        "none",
        description="none; sign_flip: send global − scale·Δ; scale: send global + scale·Δ; gaussian: send global "
        "+ N(0, scale²) per coordinate; nan: send NaN; flipped_feedback: the client's human answers inverted "
        "(pairs flipped, ratings mirrored on the scale), poisoning its reward model.",
    )
    fraction: Float = Field(
        0.2, ge=0.0, le=1.0,
        description="Share of the clients that are malicious (round(fraction · K), drawn from the seed).",
    )
    scale: Float = Field(1.0, gt=0.0, description="Magnitude of sign_flip, scale and gaussian.")


class DPConfig(_Section):
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018), central or distributed noise."""

    enabled: bool = Field(False, description="Clip every update and add Gaussian noise to their sum.")
    mode: Literal["central", "distributed"] = Field(
        "central",
        description="Who adds the noise: the driver (central), or each sampled client its share from its own "
        "secret (distributed: with secure aggregation the driver never sees an un-noised sum). Under secure "
        "aggregation the clients clip in both modes.",
    )
    noise_multiplier: Float = Field(1.0, gt=0.0, description="σ: the noise on the sum has std σ·C.")
    clip_norm: Float = Field(1.0, gt=0.0, description="C: each client's model change is clipped to this L2 norm.")
    delta: Float = Field(1e-5, gt=0.0, lt=1.0, description="δ of the reported (ε, δ) guarantee.")
    target_epsilon: Float | None = Field(
        None, gt=0.0, description="Stop the run before a round that would take ε past this (none: run every round)."
    )
    adaptive_clipping: bool = Field(
        False, description="Move C towards a quantile of the update norms (Andrew et al. 2021)."
    )
    target_quantile: Float = Field(0.5, gt=0.0, lt=1.0, description="Adaptive clipping: the quantile γ C tracks.")
    clip_learning_rate: Float = Field(0.2, gt=0.0, description="Adaptive clipping: η of C ← C·exp(−η(b̃ − γ)).")
    clipped_count_stddev: Float | None = Field(
        None, gt=0.0,
        description="Adaptive clipping: σ_b, the noise on the count of unclipped updates "
        "(default: expected clients per round / 20; must exceed noise_multiplier).",
    )


class PrivacyConfig(_Section):
    """Privacy layers: secure aggregation of the updates, client-level DP of the aggregate."""

    secure_aggregation: bool = Field(
        False,
        description="Pairwise-masked updates (Bonawitz et al. 2017, SecAgg+ neighbours): the driver only "
        "learns the sum; weighted FedAvg, dense rows.",
    )
    secagg_fraction_bits: Int = Field(
        24, ge=8, le=40, description="Fixed-point fraction bits of masked values (rounding ≤ 2^-(bits+1) each)."
    )
    secagg_threshold: Float = Field(
        0.5, gt=0.0, le=1.0,
        description="Share of a client's neighbours needed to rebuild its secrets (always more than half).",
    )
    secagg_neighbours: Int | None = Field(
        None, ge=2,
        description="Neighbours per client (SecAgg+, rounded down to even); default 2⌈1.5·log2 n⌉; "
        "n − 1 or more: everyone.",
    )
    dp: DPConfig = Field(default_factory=DPConfig)


class EvaluationConfig(_Section):
    """Held-out evaluation."""

    episodes_per_user: Int = Field(5, ge=1, description="Held-out sessions per user.")
    every_n_rounds: Int = Field(1, ge=1, description="Evaluate every n rounds (and after the last).")
    ndcg_k: Int = Field(10, ge=1, description="Cut-off of NDCG.")


class TrackingConfig(_Section):
    """MLflow tracking: every run (and every Tune trial) is one MLflow run."""

    enabled: bool = Field(True, description="Log the run to MLflow.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; `--tracking-uri` wins over it, it wins over $MLFLOW_TRACKING_URI "
        "(default: sqlite:///mlflow.db, artifacts in mlartifacts/ beside it).",
    )
    experiment: str = Field("fedrlhf", description="MLflow experiment name.")
    per_client: bool = Field(True, description="Also log every client's series as `client/<id>/<metric>`.")

    @field_validator("tracking_uri")
    @classmethod
    def _known_store(cls, uri: str | None) -> str | None:
        problem = None if uri is None else tracking_uri_problem(uri)
        if problem:
            raise ValueError(problem)
        return uri

    @field_validator("experiment")
    @classmethod
    def _experiment_named(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("must name an MLflow experiment, e.g. fedrlhf")
        return name


class RayConfig(_Section):
    """Ray resources."""

    num_workers: Int | None = Field(
        None, ge=1,
        description="Client actors W (default: one per CPU, at most K); W = K is the cross-silo layout.",
    )
    cpus_per_worker: Float = Field(1.0, gt=0.0, description="CPUs reserved by each client actor.")
    num_cpus: Int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all).")
    object_store_mb: Int = Field(512, ge=64, description="Object store size for a local Ray, MB.")


class ExperimentConfig(_Section):
    """One experiment. Every other seed is derived from ``seed``."""

    name: str = Field(
        "experiment", max_length=200, description="Experiment name (run directory and MLflow run name)."
    )
    seed: Int = Field(0, ge=0, description="The root seed.")
    env: EnvConfig = Field(default_factory=EnvConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    shaping: ShapingConfig = Field(default_factory=ShapingConfig)
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    lm: LMConfig = Field(default_factory=LMConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("name")
    @classmethod
    def _usable_as_directory(cls, name: str) -> str:
        # The name becomes the run directory under --out (and the MLflow run name).
        if not name.strip() or name in (".", "..") or any(c in name for c in "/\\") or not name.isprintable():
            raise ValueError(
                "must be usable as a directory name: not empty, '.' or '..', no '/', '\\' or control character"
            )
        return name

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        lam = self.shaping.lam
        if isinstance(lam, list) and len(lam) != self.clients.num_clients:
            raise ValueError(
                f"shaping.lambda lists {len(lam)} values but clients.num_clients is {self.clients.num_clients}"
            )
        fed, k = self.federation, self.clients.num_clients
        per_round = fed.clients_per_round
        if per_round > 1.0 and per_round > k:
            raise ValueError(f"federation.clients_per_round ({int(per_round)}) exceeds clients.num_clients ({k})")
        # The centralized baseline trains one pooled client, so min_results is moot there.
        sampled = self.clients_per_round_count(k)
        if fed.baseline != "centralized" and fed.min_results > sampled:
            raise ValueError(
                f"federation.min_results: got {fed.min_results} — at most the {sampled} clients sampled per round "
                f"(federation.clients_per_round {per_round:g} of clients.num_clients {k})"
            )
        if fed.strategy in ("krum", "multi_krum") and fed.baseline == "federated":
            f = fed.krum_byzantine
            if sampled <= 2 * f + 2:
                raise ValueError(
                    f"federation.krum_byzantine: got {f} — {fed.strategy} needs more than 2f + 2 = {2 * f + 2} "
                    f"clients a round, and {sampled} are sampled (raise federation.clients_per_round or lower f)"
                )
            if fed.strategy == "multi_krum" and fed.multi_krum_selected > sampled - f:
                raise ValueError(
                    f"federation.multi_krum_selected: got {fed.multi_krum_selected} — at most the {sampled} clients "
                    f"sampled a round minus federation.krum_byzantine ({f}) = {sampled - f}"
                )
        dp = self.privacy.dp
        if dp.enabled:
            if fed.baseline != "federated":
                raise ValueError(
                    f"privacy.dp.enabled: got true — client-level DP protects clients in an aggregate, and "
                    f"federation.baseline {fed.baseline!r} aggregates none (use baseline: federated)"
                )
            if fed.strategy not in ("fedavg", "fedprox"):
                raise ValueError(
                    f"privacy.dp.enabled: got true — DP-FedAvg averages clipped updates, so it replaces the "
                    f"aggregation: federation.strategy must be fedavg or fedprox, not {fed.strategy!r}"
                )
            expected = sampled
            count_stddev = dp.clipped_count_stddev if dp.clipped_count_stddev is not None else expected / 20.0
            if dp.adaptive_clipping and count_stddev <= dp.noise_multiplier:
                source = f"the default, {expected} clients / 20" if dp.clipped_count_stddev is None else "as set"
                raise ValueError(
                    f"privacy.dp.clipped_count_stddev: got {count_stddev:g} ({source}) "
                    f"— adaptive clipping needs it above privacy.dp.noise_multiplier ({dp.noise_multiplier:g})"
                )
            if dp.target_epsilon is not None:
                from fedrlhf_ray.privacy.dp import first_round_epsilon  # dp_accounting: only when used

                first = first_round_epsilon(dp, k, sampled)
                if first > dp.target_epsilon:
                    raise ValueError(
                        f"privacy.dp.target_epsilon: got {dp.target_epsilon:g} — one round already spends ε = "
                        f"{first:.3g} at δ = {dp.delta:g} (noise_multiplier {dp.noise_multiplier:g}, {sampled} of "
                        f"{k} clients a round); raise noise_multiplier or target_epsilon"
                    )
        if self.privacy.secure_aggregation:
            allowed = ("fedavg", "fedprox")
            if fed.baseline != "federated" or fed.strategy not in allowed:
                what = f"federation.baseline {fed.baseline!r}" if fed.baseline != "federated" else (
                    f"federation.strategy {fed.strategy!r}"
                )
                raise ValueError(
                    f"privacy.secure_aggregation: got true — the driver then only learns the sum of the updates, "
                    f"which {what} cannot use (it needs fedavg or fedprox, baseline federated)"
                )
            if sampled < 3:
                raise ValueError(
                    f"privacy.secure_aggregation: got true — it needs at least 3 clients a round "
                    f"({sampled} are sampled); with 2, each client learns the other's update from the sum"
                )
        if self.attack.kind != "none" and fed.baseline == "centralized":
            raise ValueError(
                f"attack.kind: got {self.attack.kind!r} — the centralized baseline pools every client into one, "
                "so no client can attack it (set attack.kind: none)"
            )
        if fed.personalization == "finetune" and fed.finetune_iterations == 0:
            raise ValueError(
                "federation.finetune_iterations: got 0 — must be >= 1 under personalization 'finetune' "
                "(or set federation.personalization: none)"
            )
        if fed.personalization == "personal_head" and not fed.personal_layers:
            raise ValueError(
                "federation.personal_layers: got [] — personalization 'personal_head' needs at least one "
                "parameter-name prefix to keep on the clients, e.g. scorer.score_head."
            )
        if self.ray.num_cpus is not None:
            shortfall = _cpu_shortfall(self, self.ray.num_cpus, "ray.num_cpus")
            if shortfall:
                raise ValueError(shortfall)
        return self

    @model_validator(mode="after")
    def _text_window_fits(self) -> ExperimentConfig:
        if self.env.name != "imdb":
            return self
        imdb, lm = self.env.imdb, self.lm
        if lm.n_embd % lm.n_head:
            raise ValueError(f"lm.n_embd: got {lm.n_embd} — must be a multiple of lm.n_head ({lm.n_head})")
        window = imdb.prompt_tokens + imdb.generate_tokens
        if lm.pretrained is None and window > lm.context:
            raise ValueError(
                f"env.imdb.generate_tokens: got {imdb.generate_tokens} — env.imdb.prompt_tokens "
                f"({imdb.prompt_tokens}) + generate_tokens = {window} must fit lm.context ({lm.context})"
            )
        if lm.sentiment.feedback == "preferences" and lm.sentiment.pretrained is not None:
            raise ValueError(
                "lm.sentiment.feedback: got 'preferences' — a pretrained scorer (lm.sentiment.pretrained) "
                "is not fitted, so it learns from no feedback; use feedback: labels or unset pretrained"
            )
        return self

    @model_validator(mode="after")
    def _synthetic_world_fits(self) -> ExperimentConfig:
        env, syn = self.env, self.env.synthetic
        if env.name != "synthetic":
            return self
        most = syn.n_items - env.slate_size
        if syn.items_per_user > most:
            raise ValueError(
                f"env.synthetic.items_per_user: got {syn.items_per_user} — at most env.synthetic.n_items "
                f"({syn.n_items}) - env.slate_size ({env.slate_size}) = {most}: a slate is filled with items "
                "the user never watched"
            )
        n_held = max(1, round(env.heldout_fraction * syn.items_per_user))  # as envs.synthetic splits
        n_train = syn.items_per_user - n_held
        needed = 1 if self.feedback.kind == "rating" else 2
        if n_train < needed:
            why = "a pairwise query compares two" if needed == 2 else "training needs one"
            raise ValueError(
                f"env.heldout_fraction: got {env.heldout_fraction:g} — holds out {n_held} of the "
                f"{syn.items_per_user} items per user (env.synthetic.items_per_user), leaving {n_train} "
                f"for training; at least {needed} must remain ({why})"
            )
        return self

    def client_lambdas(self) -> list[float]:
        """λ_k for every client."""
        lam, k = self.shaping.lam, self.clients.num_clients
        if isinstance(lam, LambdaSpread):
            if k == 1:
                return [lam.low]
            return [lam.low + (lam.high - lam.low) * i / (k - 1) for i in range(k)]
        if isinstance(lam, list):
            return [float(x) for x in lam]
        return [float(lam)] * k

    def clients_per_round_count(self, pool: int) -> int:
        """Clients sampled per round out of ``pool`` (a count, or a fraction rounded up)."""
        per_round = self.federation.clients_per_round
        if per_round > 1.0:
            return min(int(per_round), pool)
        # 1e-9 keeps e.g. 0.07 × 100 = 7.000000000000001 from rounding up to 8.
        return min(pool, max(1, math.ceil(per_round * pool - 1e-9)))

    def evaluation_due(self, round_index: int) -> bool:
        """Whether round ``round_index`` ends with an evaluation (always the last one)."""
        return round_index % self.evaluation.every_n_rounds == 0 or round_index == self.federation.rounds

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _cpu_shortfall(cfg: ExperimentConfig, cpus: float, what: str) -> str | None:
    """Why the client actors cannot all be placed on ``cpus`` CPUs (Ray would wait forever), or None."""
    ray_cfg = cfg.ray
    per_worker = ray_cfg.cpus_per_worker
    if per_worker > cpus:
        return f"ray.cpus_per_worker: got {per_worker:g} — at most {what} ({cpus:g}), or no client actor can start"
    if ray_cfg.num_workers is not None:
        workers = min(ray_cfg.num_workers, cfg.clients.num_clients)  # as many actors as the driver starts
        needed = workers * per_worker
        if needed > cpus + 1e-9:  # 1e-9: e.g. 3 × 0.1 CPUs is 0.30000000000000004
            return (
                f"ray.num_workers: got {ray_cfg.num_workers} — {workers} client actors × ray.cpus_per_worker "
                f"{per_worker:g} = {needed:g} CPUs, more than {what} ({cpus:g})"
            )
    return None


# MLflow's built-in tracking stores (mlflow.tracking._tracking_service.utils); the SQLAlchemy
# databases may name a driver, e.g. postgresql+psycopg2://.
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_TRACKING_SCHEMES = ("file", "http", "https", "databricks", "databricks-uc", "uc", *_DATABASE_SCHEMES)
_TRACKING_ALLOWED = "a path, file://, sqlite:///, http(s)://, postgresql://, mysql://, mssql:// or databricks://"


def tracking_uri_problem(uri: str) -> str | None:
    """What is wrong with an MLflow tracking URI (and what is allowed), or None if MLflow can use it."""
    if not uri.strip():
        return f"must be {_TRACKING_ALLOWED} (leave it unset for the default)"
    try:
        parts = urlsplit(uri)
    except ValueError:
        return f"is not a valid URI; use {_TRACKING_ALLOWED}"
    scheme = parts.scheme.lower()
    if len(scheme) <= 1:  # a plain path; a one-letter scheme is a Windows drive
        return None
    base = scheme.split("+", 1)[0]
    if base not in _TRACKING_SCHEMES:
        return f"{scheme}:// is not an MLflow tracking store; use {_TRACKING_ALLOWED}"
    if base in ("http", "https") and not parts.netloc:
        return f"{scheme}:// needs a host, e.g. http://127.0.0.1:5000"
    if base == "sqlite" and not (uri.partition(":")[2].startswith("///") and len(parts.path) > 1):
        return "a SQLite store is sqlite:///<file>, e.g. sqlite:///mlflow.db"
    return None


def _memory_bytes() -> int:
    """Memory a local Ray may use: the machine's, or a lower cgroup (container) limit, as Ray reads it."""
    import psutil

    total = psutil.virtual_memory().total
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def _shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, where a local Ray on Linux keeps its object store; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stats.f_bsize * stats.f_bavail


def _machine_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# Ray refuses an object store larger than /dev/shm above this size (ray_constants.REQUIRE_SHM_SIZE_THRESHOLD)
# unless RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE is set; below it, it falls back to (slow) /tmp.
_RAY_SHM_REQUIRED_ABOVE = 10**10
_MB = 1024 * 1024


def check_machine(cfg: ExperimentConfig) -> list[str]:
    """Check ``cfg.ray`` against this machine before starting a local Ray on it.

    Raises a one-line ConfigError when Ray could not start, or could never place the client
    actors; returns one-line warnings for what would only run slowly. Not for a joined cluster
    or a Tune trial: their resources are elsewhere.
    """
    ray_cfg = cfg.ray
    if ray_cfg.num_cpus is None:  # a set num_cpus is checked by validation (Ray oversubscribes it)
        shortfall = _cpu_shortfall(cfg, _machine_cpus(), "this machine's CPUs")
        if shortfall:
            raise ConfigError(shortfall)
    store = ray_cfg.object_store_mb * _MB
    memory = _memory_bytes()
    if store > memory:
        raise ConfigError(
            f"ray.object_store_mb: got {ray_cfg.object_store_mb} — more than this machine's memory ({memory // _MB} MB)"
        )
    shm = _shm_free_bytes()
    if shm is None or store <= shm:
        return []
    if store > _RAY_SHM_REQUIRED_ABOVE and not os.environ.get("RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE"):
        raise ConfigError(
            f"ray.object_store_mb: got {ray_cfg.object_store_mb} — more than /dev/shm's free {shm // _MB} MB "
            "(enlarge /dev/shm, e.g. docker run --shm-size, or lower it)"
        )
    slow = (
        f"ray.object_store_mb: {ray_cfg.object_store_mb} MB is more than /dev/shm's free {shm // _MB} MB: "
        "Ray keeps the object store in /tmp instead, which is slower"
    )
    return [slow]


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_at(loc: list[str]) -> type[BaseModel]:
    """The section at ``loc`` (field names and λ's form tags), whose fields an unknown key is listed with."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        if part == "spread":
            model = LambdaSpread
            continue
        for name, field in model.model_fields.items():
            if part in (name, field.alias) and isinstance(field.annotation, type) and issubclass(
                field.annotation, BaseModel
            ):
                model = field.annotation
    return model


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"]]
    names = [p for i, p in enumerate(parts) if not (i and parts[i - 1] == "lambda" and p in _LAMBDA_FORMS)]
    loc = ".".join(names)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown field — allowed: {', '.join(_allowed_fields(_model_at(parts[:-1])))}"
    value = first.get("input")
    if isinstance(value, dict) and first["type"] not in ("model_type", "dict_type"):
        return f"{loc}: {msg}" if loc else msg
    if loc and "input" in first:
        return f"{loc}: got {_short_repr(value)} — {msg}"
    return f"{loc}: {msg}" if loc else msg


def _allowed_fields(model: type[BaseModel]) -> list[str]:
    return sorted(f.alias or name for name, f in model.model_fields.items())


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig` or raise a one-line ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. federation.rounds=3")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be a dotted field path, e.g. ppo.lr")
    try:
        parsed = _load_yaml(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({_yaml_problem(err, value)[1]})") from None
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key=value`` override set at its dotted path."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        _set_path(out, path, value, f"--set {text!r}")
    return out


def with_values(raw: dict[str, Any], values: dict[str, Any], label: str = "") -> dict[str, Any]:
    """Return a copy of ``raw`` with ``{"dotted.key": value}`` set (a sweep's sampled values)."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        _set_path(out, key.split("."), value, f"{label}{key}")
    return out


def _set_path(tree: dict[str, Any], path: list[str], value: Any, label: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{label}: {'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only: no tag builds a Python object) that refuses a key
    given twice in one mapping; PyYAML itself silently keeps the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}, first given on line {first.line + 1}", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader: plain data only


def _yaml_problem(err: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """(1-based line or None, the problem in one line) of a PyYAML error while reading ``text``."""
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow; no mark
        line = text.count("\n", 0, err.position) + 1
        return line, f"character #x{err.character:04x} is not allowed in YAML"
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return (mark.line + 1 if mark is not None else None), " ".join(problem.split())


# An experiment or sweep file is a few KB; anything this big is another file given by mistake.
_MAX_CONFIG_BYTES = 1024 * 1024


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; any other content is a one-line ConfigError."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, not a config file")
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    if not p.is_file():
        raise ConfigError(f"{p}: is not a regular file")
    try:
        size = p.stat().st_size
        if size > _MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: is {size:,} bytes — not a config file (at most {_MAX_CONFIG_BYTES:,})")
        data = p.read_bytes()
    except PermissionError:
        raise ConfigError(f"{p}: cannot be read (permission denied)") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot be read ({err.strerror or err})") from None
    # (UTF-32-LE's BOM is UTF-16-LE's + 00 00.)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE)):
        raise ConfigError(f"{p}: is UTF-16 or UTF-32 text — save it as UTF-8")
    if b"\0" in data:
        raise ConfigError(f"{p}: holds NUL bytes — binary data, not a UTF-8 YAML file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{p}: is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}) — save it as UTF-8"
        ) from None
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as err:
        line, problem = _yaml_problem(err, text)
        where = f" line {line}" if line is not None else ""
        raise ConfigError(f"{p}:{where} invalid YAML ({problem})") from None
    if raw is None:
        raise ConfigError(f"{p}: holds no settings (it is empty or only comments) — write {{}} for all defaults")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate one experiment file."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        return validate_config(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def reference_rows(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted field, default, description) for every leaf field: the README's reference."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(reference_rows(annotation, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((key, "null" if default is None else str(default), field.description or ""))
    return rows


def reference_markdown() -> str:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | {m} |" for k, d, m in reference_rows()]
    return "\n".join(lines)
