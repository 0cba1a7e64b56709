"""The experiment schema: one YAML file = one experiment, typed.

Every field has a description (``docs/configuration.md``'s reference is generated from the same
text, see ``config_reference``) and a type, bounds and allowed values checked by pydantic. Integer
fields take numbers only (3 or 3.0, not ``true`` or ``"3"``), float fields finite numbers only
(no ``.nan``/``.inf``). The checks that relate sections owned by different subsystems (a strategy
and the clients sampled, DP and the strategy, a task's env and its model...) are those
subsystems' own, run by ``preflight``; reading a file, overrides and one-line errors are
``config``'s. This module is a leaf: it imports nothing of the platform.
"""

from __future__ import annotations

import math
import numbers
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

DatasetName = Literal["ml-latest-small", "ml-100k", "ml-1m", "ml-25m"]
DATASETS: tuple[str, ...] = get_args(DatasetName)
# The aggregation strategies (``strategies.STRATEGIES`` implements each; a test checks they agree).
STRATEGY_NAMES = ("fedavg", "fedprox", "median", "trimmed_mean", "krum", "multi_krum", "norm_bound")


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


def _boolean(value: Any) -> Any:
    # Lax pydantic reads "yes", "off", 1 and 0 as booleans; a quoted "yes" in a config is a
    # mistake (YAML's own yes/no/true/false arrive here as booleans already).
    if not isinstance(value, bool):
        raise PydanticCustomError("boolean", "must be true or false (unquoted), not a string or a number")
    return value


Int = Annotated[int, BeforeValidator(_whole_number)]
Bool = Annotated[bool, BeforeValidator(_boolean)]
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
    download: Bool = Field(False, description="Download the official archive if no copy is found.")
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
    download: Bool = Field(False, description="Download the official archive if no copy is found.")
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
    corpus: Literal["unsup", "train+unsup"] = Field(
        "unsup",
        description="Pre-training text: IMDb's unlabelled reviews, which no client holds (the public model knows "
        "no client's text), or also the train reviews the clients' shards come from (the paper's setting).",
    )
    max_texts: Int = Field(0, ge=0, description="Use at most this many reviews for prepare (0: all).")
    pretrain_steps: Int = Field(4000, ge=1, description="Optimizer steps of pre-training.")
    pretrain_batch_size: Int = Field(32, ge=1, description="Sequences per pre-training step.")
    pretrain_lr: Float = Field(3e-3, gt=0.0, description="Peak AdamW learning rate (cosine decay).")
    pretrain_seed: Int = Field(
        0, ge=0, description="Seed of prepare: the public model is the same whatever the experiment's seed."
    )
    kl_coeff: Float = Field(
        0.05, ge=0.0, description="β of the KL penalty: each generated token's reward gets −β·(log π − log π_ref)."
    )
    adaptive_kl: Bool = Field(
        True, description="Adapt β per client towards target_kl (Ziegler et al.); β is kept in the client's record. "
        "Off, β stays kl_coeff and KL to the reference grew every round (0.8 → 8.3 nats in imdb_small)."
    )
    target_kl: Float = Field(2.0, gt=0.0, description="Adaptive KL: target KL per generated sequence (nats).")
    kl_horizon: Float = Field(
        10.0, gt=0.0, description="Adaptive KL: rounds over which β moves by the (clipped) relative error."
    )
    eval_temperature: Float = Field(1.0, gt=0.0, description="Sampling temperature of evaluation generations.")
    sentiment: SentimentConfig = Field(default_factory=SentimentConfig)


class SlateEnvConfig(_Section):
    """The fields every slate-recommendation env shares (synthetic, MovieLens)."""

    slate_size: Int = Field(10, ge=2, le=100, description="Candidates shown per step (M).")
    session_length: Int = Field(10, ge=1, le=1000, description="Steps per episode (one session).")
    history_length: Int = Field(10, ge=1, le=200, description="Recent training items in the observation.")
    positives_per_slate: Int = Field(3, ge=0, description="Watched items among the M candidates.")
    heldout_fraction: Float = Field(
        0.2, gt=0.0, lt=1.0, description="Latest fraction of each user's interactions held out for evaluation."
    )
    # Every environment rates on a scale up to 5: a higher threshold would like nothing.
    like_threshold: Float = Field(4.0, gt=0.0, le=5.0, description="A rating at or above this is 'liked'.")

    @model_validator(mode="after")
    def _positives_fit_slate(self) -> SlateEnvConfig:
        if self.positives_per_slate > self.slate_size:
            raise ValueError(
                f"positives_per_slate ({self.positives_per_slate}) must be <= slate_size ({self.slate_size})"
            )
        return self


class SyntheticEnvConfig(SlateEnvConfig):
    """Slate recommendation in the synthetic world."""

    name: Literal["synthetic"] = Field("synthetic", description="Which environment.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


class MovieLensEnvConfig(SlateEnvConfig):
    """Slate recommendation on MovieLens users."""

    name: Literal["movielens"] = Field("movielens", description="Which environment.")
    data: DataConfig = Field(default_factory=DataConfig)


class ImdbEnvConfig(_Section):
    """IMDb text continuation (its language model is the top-level ``lm`` section)."""

    name: Literal["imdb"] = Field("imdb", description="Which environment.")
    imdb: ImdbConfig = Field(default_factory=ImdbConfig)


# Each env carries only its own fields, chosen by ``name`` (default: synthetic).
ENV_SECTIONS: dict[str, type[_Section]] = {
    "synthetic": SyntheticEnvConfig,
    "movielens": MovieLensEnvConfig,
    "imdb": ImdbEnvConfig,
}
ENV_NAMES: tuple[str, ...] = tuple(ENV_SECTIONS)
DEFAULT_ENV = "synthetic"  # the env of a config that names none
# Top-level sections that belong to one env only: section -> (its env, its model).
ENV_ONLY_SECTIONS: dict[str, tuple[str, type[_Section]]] = {"lm": ("imdb", LMConfig)}


def _env_tag(value: Any) -> str | None:
    name = value.get("name", DEFAULT_ENV) if isinstance(value, dict) else getattr(value, "name", None)
    return name if isinstance(name, str) and name in ENV_SECTIONS else None


EnvConfig = Annotated[
    Annotated[SyntheticEnvConfig, Tag("synthetic")]
    | Annotated[MovieLensEnvConfig, Tag("movielens")]
    | Annotated[ImdbEnvConfig, Tag("imdb")],
    Discriminator(
        _env_tag, custom_error_type="env_name",
        custom_error_message=f"env.name must be one of {', '.join(ENV_NAMES)}",
    ),
]

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
    sparse_rows: Bool = Field(
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

    enabled: Bool = Field(False, description="Clip every update and add Gaussian noise to their sum.")
    mode: Literal["central", "distributed"] = Field(
        "central",
        description="Who adds the noise: the driver (central), or each sampled client its share from its own "
        "secret (distributed: with secure aggregation the driver never sees an un-noised sum). Under secure "
        "aggregation the clients clip in both modes.",
    )
    # Past ~1e4 the accountant's Rényi series lose their precision (ε comes out 0 or overflows).
    noise_multiplier: Float = Field(1.0, gt=0.0, le=1000.0, description="σ: the noise on the sum has std σ·C.")
    clip_norm: Float = Field(1.0, gt=0.0, description="C: each client's model change is clipped to this L2 norm.")
    delta: Float = Field(1e-5, gt=0.0, lt=1.0, description="δ of the reported (ε, δ) guarantee.")
    target_epsilon: Float | None = Field(
        None, gt=0.0, description="Stop the run before a round that would take ε past this (none: run every round)."
    )
    adaptive_clipping: Bool = Field(
        False, description="Move C towards a quantile of the update norms (Andrew et al. 2021)."
    )
    target_quantile: Float = Field(0.5, gt=0.0, lt=1.0, description="Adaptive clipping: the quantile γ C tracks.")
    clip_learning_rate: Float = Field(0.2, gt=0.0, description="Adaptive clipping: η of C ← C·exp(−η(b̃ − γ)).")
    clipped_count_stddev: Float | None = Field(
        None, gt=0.0, le=10000.0,
        description="Adaptive clipping: σ_b, the noise on the count of unclipped updates "
        "(default: expected clients per round / 20; must exceed noise_multiplier).",
    )


class PrivacyConfig(_Section):
    """Privacy layers: secure aggregation of the updates, client-level DP of the aggregate."""

    secure_aggregation: Bool = Field(
        False,
        description="Pairwise-masked updates (Bonawitz et al. 2017, SecAgg+ neighbours): the driver only "
        "learns the sum; weighted FedAvg, dense rows.",
    )
    secagg_adversary: Literal["malicious", "honest_but_curious"] = Field(
        "malicious",
        description="Server secure aggregation withstands: malicious (signed keys from a registry of client "
        "identities, a consistency round before shares are revealed) or honest_but_curious (neither; cheaper).",
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

    enabled: Bool = Field(True, description="Log the run to MLflow.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; `--tracking-uri` wins over it, it wins over $MLFLOW_TRACKING_URI "
        "(default: sqlite:///mlflow.db, artifacts in mlartifacts/ beside it).",
    )
    experiment: str = Field("fedrlhf", description="MLflow experiment name.")
    per_client: Bool = Field(True, description="Also log every client's series as `client/<id>/<metric>`.")

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
    driver_resources: dict[Annotated[str, Field(min_length=1)], Annotated[Float, Field(ge=0.0)]] | None = Field(
        None,
        description="Ray resources of the driver actor, e.g. {CPU: 1} or a custom node resource "
        "{driver_node: 1} to pin it; default: no CPU, on the node the run started from (in a Tune trial: "
        "in the trial's placement group).",
    )


class ExperimentConfig(_Section):
    """One experiment. Every other seed is derived from ``seed``."""

    name: str = Field(
        "experiment", max_length=200, description="Experiment name (run directory and MLflow run name)."
    )
    seed: Int = Field(0, ge=0, description="The root seed.")
    env: EnvConfig = Field(default_factory=SyntheticEnvConfig, description="The environment, by `env.name`.")
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    shaping: ShapingConfig = Field(default_factory=ShapingConfig)
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    lm: LMConfig | None = Field(
        None, description="The language model (only with env.name imdb, where it defaults to LMConfig's defaults)."
    )
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

    @model_validator(mode="before")
    @classmethod
    def _sections_of_the_env(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        env = raw.get("env")
        name = env.get("name", DEFAULT_ENV) if isinstance(env, dict) else getattr(env, "name", DEFAULT_ENV)
        raw = dict(raw)
        for section, (owner, _) in ENV_ONLY_SECTIONS.items():
            if name == owner:
                if raw.get(section) is None:
                    raw[section] = {}
            elif raw.get(section) is not None:
                raise PydanticCustomError(
                    "env_section", "{section}: only env.name {owner} has this section (env.name is {name}); remove it",
                    {"section": section, "owner": owner, "name": name},
                )
        return raw

    @model_validator(mode="after")
    def _one_lambda_per_client(self) -> ExperimentConfig:
        lam = self.shaping.lam
        if isinstance(lam, list) and len(lam) != self.clients.num_clients:
            raise ValueError(
                f"shaping.lambda lists {len(lam)} values but clients.num_clients is {self.clients.num_clients}"
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
        return self.model_dump(mode="json", by_alias=True, exclude_none=False, exclude={
            section for section, (owner, _) in ENV_ONLY_SECTIONS.items() if owner != self.env.name
        })

    def slate_env(self) -> SlateEnvConfig:
        """The slate-recommendation env's settings (synthetic or MovieLens)."""
        if not isinstance(self.env, SlateEnvConfig):
            raise TypeError(f"env.name {self.env.name} is not a slate-recommendation env")
        return self.env

    def movielens(self) -> DataConfig:
        """``env.data`` of a MovieLens config."""
        if not isinstance(self.env, MovieLensEnvConfig):
            raise TypeError(f"env.name {self.env.name} has no MovieLens data")
        return self.env.data

    def synthetic(self) -> SyntheticConfig:
        """``env.synthetic`` of a synthetic config."""
        if not isinstance(self.env, SyntheticEnvConfig):
            raise TypeError(f"env.name {self.env.name} has no synthetic world")
        return self.env.synthetic

    def imdb(self) -> ImdbConfig:
        """``env.imdb`` of an IMDb config."""
        if not isinstance(self.env, ImdbEnvConfig):
            raise TypeError(f"env.name {self.env.name} has no IMDb data")
        return self.env.imdb

    def language_model(self) -> LMConfig:
        """``lm`` of an IMDb config."""
        if self.lm is None:
            raise TypeError(f"env.name {self.env.name} has no language model")
        return self.lm
