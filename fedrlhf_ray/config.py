"""Typed experiment configuration: one YAML file = one experiment.

Every field has a description (the README's configuration reference is generated from the
same text) and is validated before anything runs. Errors are reported in one line that names
the field, the bad value and what is allowed, e.g.::

    federation.rounds: got 0 — must be >= 1
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DATASETS = ("ml-latest-small", "ml-100k", "ml-1m", "ml-25m")


class ConfigError(ValueError):
    """A user mistake in a config file or override; its message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class SyntheticConfig(_Section):
    """The synthetic world (used when ``env.name`` is ``synthetic``)."""

    n_items: int = Field(300, ge=20, description="Items in the catalogue.")
    latent_dim: int = Field(8, ge=1, description="Dimension of user and item taste vectors.")
    n_clusters: int = Field(4, ge=1, description="Preference clusters; each client has a home cluster, assigned round-robin.")
    home_cluster_prob: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Probability that a user comes from the client's home cluster (else a random cluster); 1 = clients with a single taste.",
    )
    heterogeneity: float = Field(
        0.7, ge=0.0, le=1.0,
        description="0: all clients share one taste distribution; 1: clusters are unrelated.",
    )
    feature_noise: float = Field(0.1, ge=0.0, description="Noise on the observed item features.")
    items_per_user: int = Field(60, ge=4, description="Items each user watched (their interactions).")
    popularity_weight: float = Field(1.5, ge=0.0, description="How much popularity drives what users watch (engagement).")
    taste_weight: float = Field(
        0.2, ge=0.0,
        description="How much personal taste drives what users watch; low values make engagement and taste disagree, so human feedback matters.",
    )


class DataConfig(_Section):
    """MovieLens data (used when ``env.name`` is ``movielens``)."""

    dataset: Literal[DATASETS] = Field("ml-latest-small", description="MovieLens release.")
    path: str | None = Field(
        None, description="Extracted folder or official zip; default: the cache directory."
    )
    cache_dir: str | None = Field(None, description="Cache directory (default $FEDRLHF_CACHE or ~/.cache/fedrlhf).")
    download: bool = Field(False, description="Download the official archive if no copy is found.")
    min_ratings: int = Field(20, ge=2, description="Users with fewer ratings are not eligible as clients.")


class EnvConfig(_Section):
    """The recommendation environment."""

    name: Literal["synthetic", "movielens"] = Field("synthetic", description="Which environment.")
    slate_size: int = Field(10, ge=2, le=100, description="Candidates shown per step (M).")
    session_length: int = Field(10, ge=1, le=1000, description="Steps per episode (one session).")
    history_length: int = Field(10, ge=1, le=200, description="Recent training items in the observation.")
    positives_per_slate: int = Field(3, ge=0, description="Watched items among the M candidates.")
    heldout_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Latest fraction of each user's interactions held out for evaluation."
    )
    like_threshold: float = Field(4.0, description="A rating at or above this is 'liked'.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    @model_validator(mode="after")
    def _positives_fit_slate(self) -> EnvConfig:
        if self.positives_per_slate > self.slate_size:
            raise ValueError(
                f"positives_per_slate ({self.positives_per_slate}) must be <= slate_size ({self.slate_size})"
            )
        return self


class ClientsConfig(_Section):
    """How clients are formed."""

    num_clients: int = Field(5, ge=1, description="K, the number of clients.")
    formation: Literal["user", "group"] = Field(
        "user", description="'user': one user per client (paper); 'group': several users per client (cross-silo)."
    )
    users_per_client: int = Field(1, ge=1, description="Users per client when formation is 'group'.")
    grouping: Literal["random", "taste"] = Field(
        "random", description="Group users at random or by taste (more heterogeneous clients)."
    )


class FeedbackConfig(_Section):
    """The simulated human of each client."""

    kind: Literal["pairwise", "rating", "both"] = Field(
        "pairwise", description="Pairwise comparisons, direct noisy ratings, or half of each."
    )
    beta: float = Field(2.0, ge=0.0, description="Bradley–Terry rationality β (0 = random answers).")
    rating_noise: float = Field(0.5, ge=0.0, description="Std of the noise on direct ratings.")
    budget_per_round: int = Field(100, ge=1, description="Queries a client may ask per round.")
    query_strategy: Literal["random", "uncertainty"] = Field(
        "random", description="How queries are chosen; 'uncertainty' asks where the reward model is least sure."
    )
    pool_factor: int = Field(5, ge=1, description="Candidate pool size for active queries, as a multiple of the budget.")


class RewardModelConfig(_Section):
    """The client-local reward model H_k."""

    hidden: int = Field(32, ge=1, description="Hidden units.")
    embedding_dim: int = Field(0, ge=0, description="Learned item embedding size (0 = features only).")
    lr: float = Field(3e-3, gt=0.0, description="Adam learning rate.")
    weight_decay: float = Field(1e-4, ge=0.0, description="Adam weight decay.")
    epochs: int = Field(10, ge=1, description="Epochs over all accumulated feedback per fit.")
    batch_size: int = Field(64, ge=1, description="Mini-batch size.")


class LambdaSpread(_Section):
    """λ_k spread linearly over clients, as in the paper (0.1 → 0.9)."""

    low: float = Field(0.1, ge=0.0, description="λ of the first client.")
    high: float = Field(0.9, ge=0.0, description="λ of the last client.")


class ShapingConfig(_Section):
    """Reward shaping R = R⁰ + λ·H."""

    lam: float | list[Annotated[float, Field(ge=0.0)]] | LambdaSpread = Field(
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

    lr: float = Field(1e-3, gt=0.0, description="Learning rate.")
    gamma: float = Field(0.0, ge=0.0, le=1.0, description="Discount (0: picks in a session are independent).")
    lambda_gae: float = Field(0.95, ge=0.0, le=1.0, description="GAE λ.")
    clip_param: float = Field(0.2, gt=0.0, description="PPO clip.")
    entropy_coeff: float = Field(0.01, ge=0.0, description="Entropy bonus.")
    vf_loss_coeff: float = Field(0.5, ge=0.0, description="Value loss weight.")
    train_batch_size: int = Field(1000, ge=16, description="Env steps per PPO iteration.")
    minibatch_size: int = Field(250, ge=8, description="SGD mini-batch size.")
    num_epochs: int = Field(4, ge=1, description="SGD epochs per iteration.")
    local_iterations: int = Field(3, ge=1, description="E: PPO iterations per client per round.")
    hidden: int = Field(64, ge=4, description="Hidden units of the slate scorer.")
    embedding_dim: int = Field(16, ge=0, description="Learned item embedding size (0 = features only).")
    num_envs: int = Field(8, ge=1, description="Vectorised envs per client (batches the policy's forward passes).")

    @model_validator(mode="after")
    def _minibatch_fits(self) -> PPOSettings:
        if self.minibatch_size > self.train_batch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must be <= train_batch_size ({self.train_batch_size})"
            )
        return self


class FederationConfig(_Section):
    """The federated round loop."""

    rounds: int = Field(5, ge=1, description="Federated rounds T.")
    clients_per_round: float = Field(
        1.0, gt=0.0,
        description="Clients sampled per round: a fraction if <= 1.0, a count if an integer > 1.",
    )
    strategy: Literal["fedavg", "fedprox", "median", "trimmed_mean"] = Field(
        "fedavg", description="Aggregation strategy."
    )
    fedprox_mu: float = Field(0.01, ge=0.0, description="FedProx proximal term μ.")
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Fraction trimmed at each end (trimmed_mean).")
    personalization: Literal["none", "finetune", "personal_head"] = Field(
        "none", description="How clients personalise the global model before evaluation."
    )
    finetune_iterations: int = Field(1, ge=0, description="Local PPO iterations for 'finetune'.")
    personal_layers: list[str] = Field(
        default_factory=lambda: ["scorer.score_head."],
        description="Parameter-name prefixes that never leave a client under 'personal_head' (FedPer).",
    )
    baseline: Literal["federated", "centralized", "local"] = Field(
        "federated", description="Federated RLHF, or the centralized / local-only baseline on the same data."
    )
    straggler_timeout_s: float | None = Field(None, gt=0.0, description="Drop clients slower than this (seconds).")
    min_results: int = Field(1, ge=1, description="Fewest client results a round needs to aggregate.")

    @model_validator(mode="after")
    def _count_is_integral(self) -> FederationConfig:
        if self.clients_per_round > 1.0 and not float(self.clients_per_round).is_integer():
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) must be a fraction <= 1 or a whole count"
            )
        return self


class EvaluationConfig(_Section):
    """Held-out evaluation."""

    episodes_per_user: int = Field(5, ge=1, description="Held-out sessions per user.")
    every_n_rounds: int = Field(1, ge=1, description="Evaluate every n rounds (and after the last).")
    ndcg_k: int = Field(10, ge=1, description="Cut-off of NDCG.")


class TrackingConfig(_Section):
    """MLflow tracking: every run (and every Tune trial) is one MLflow run."""

    enabled: bool = Field(True, description="Log the run to MLflow.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; `--tracking-uri` wins over it, it wins over $MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db, artifacts in mlartifacts/ beside it).",
    )
    experiment: str = Field("fedrlhf", min_length=1, description="MLflow experiment name.")
    per_client: bool = Field(True, description="Also log every client's series as `client/<id>/<metric>`.")


class RayConfig(_Section):
    """Ray resources."""

    num_workers: int | None = Field(
        None, ge=1,
        description="Client actors W (default: one per CPU, at most K); W = K is the cross-silo layout.",
    )
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved by each client actor.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all).")
    object_store_mb: int = Field(512, ge=64, description="Object store size for a local Ray, MB.")


class ExperimentConfig(_Section):
    """One experiment. Every other seed is derived from ``seed``."""

    name: str = Field("experiment", description="Experiment name (run directory and MLflow run name).")
    seed: int = Field(0, ge=0, description="The root seed.")
    env: EnvConfig = Field(default_factory=EnvConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    shaping: ShapingConfig = Field(default_factory=ShapingConfig)
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        lam = self.shaping.lam
        if isinstance(lam, list) and len(lam) != self.clients.num_clients:
            raise ValueError(
                f"shaping.lambda lists {len(lam)} values but clients.num_clients is {self.clients.num_clients}"
            )
        per_round = self.federation.clients_per_round
        if per_round > 1.0 and per_round > self.clients.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({int(per_round)}) exceeds clients.num_clients ({self.clients.num_clients})"
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


_UNION_TAGS = ("float", "list[constrained-float]", "list[float]", "LambdaSpread")


def _format_error(err: ValidationError) -> str:
    # A union field (λ) reports one error per member; the deepest one is about the member
    # the user meant (a list item, a spread key), not "should be a number".
    first = max(err.errors(), key=lambda e: len(e["loc"]))
    loc = ".".join(str(p) for p in first["loc"] if str(p) not in _UNION_TAGS)
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if first["type"] == "extra_forbidden":
        if "LambdaSpread" in [str(p) for p in first["loc"]]:
            return f"{loc}: unknown field — allowed: {', '.join(_allowed_fields(LambdaSpread))}"
        return f"{loc}: unknown field"
    value = first.get("input")
    if isinstance(value, dict) and first["type"] not in ("model_type", "dict_type"):
        return f"{loc}: {msg}" if loc else msg
    if loc and "input" in first:
        return f"{loc}: got {value!r} — {msg}"
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
        first = err.errors()[0]
        if first["type"] == "extra_forbidden":
            model = ExperimentConfig
            for part in first["loc"][:-1]:
                annotation = model.model_fields[str(part)].annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                    model = annotation
            loc = ".".join(str(p) for p in first["loc"])
            raise ConfigError(
                f"{loc}: unknown field — allowed: {', '.join(_allowed_fields(model))}"
            ) from None
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
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from None
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


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
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
