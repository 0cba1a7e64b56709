"""Gymnasium recommendation environments and dataset loaders for fedrlhf-ray.

Importing the package registers ``fedrlhf/SyntheticRec-v0``, ``fedrlhf/MovieLensRec-v0`` and the
IMDb text env ``fedrlhf/TextContinuation-v0`` (:class:`envs.text_env.TextContinuationEnv`).
"""

import gymnasium as gym

SYNTHETIC_ENV_ID = "fedrlhf/SyntheticRec-v0"
MOVIELENS_ENV_ID = "fedrlhf/MovieLensRec-v0"
TEXT_ENV_ID = "fedrlhf/TextContinuation-v0"

for _id, _entry in (
    (SYNTHETIC_ENV_ID, "envs.registration:make_synthetic_env"),
    (MOVIELENS_ENV_ID, "envs.registration:make_movielens_env"),
    (TEXT_ENV_ID, "envs.text_env:TextContinuationEnv"),
):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry, disable_env_checker=True)
