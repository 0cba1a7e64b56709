"""Factories behind the registered Gymnasium ids.

``gym.make("fedrlhf/SyntheticRec-v0", client=0, num_clients=5, seed=0)`` and
``gym.make("fedrlhf/MovieLensRec-v0", dataset="ml-latest-small", path=..., client=0)`` build
one client's env; everything else is passed on to :class:`envs.rec_env.SlateRecEnv`.
"""

from __future__ import annotations

from typing import Any

from envs.rec_env import SlateRecEnv

_ENV_KEYS = (
    "slate_size",
    "session_length",
    "history_length",
    "positives_per_slate",
    "mode",
    "like_threshold",
)


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    env = {k: kwargs.pop(k) for k in _ENV_KEYS if k in kwargs}
    return env, kwargs


def make_synthetic_env(*, client: int = 0, num_clients: int | None = None, seed: int = 0, **kwargs):
    """One client of a synthetic world; the world is identical for every ``client`` index."""
    from envs.synthetic import make_synthetic_clients

    env_kwargs, world = _split(dict(kwargs))
    clients = make_synthetic_clients(num_clients=num_clients or client + 1, seed=seed, **world)
    return SlateRecEnv(clients[client], seed=seed, **env_kwargs)


def make_movielens_env(
    *,
    dataset: str = "ml-latest-small",
    path: str | None = None,
    cache_dir: str | None = None,
    client: int = 0,
    num_clients: int = 1,
    seed: int = 0,
    **kwargs,
):
    """One client (by default one user, the paper's setting) of a MovieLens release."""
    from envs.data.movielens import RATING_SCALES, load_movielens
    from envs.data.partition import form_clients

    env_kwargs, formation = _split(dict(kwargs))
    data = load_movielens(dataset, path, cache_dir=cache_dir)
    clients = form_clients(
        data.ratings,
        data.movies,
        data.genre_names,
        num_clients=max(num_clients, client + 1),
        rating_scale=RATING_SCALES[dataset],
        seed=seed,
        **formation,
    )
    return SlateRecEnv(clients[client], seed=seed, **env_kwargs)
