"""What a process that trains clients sets once, at its start rather than at import time.

:func:`install_process` is idempotent; a client actor calls it before it builds its trainer, and
so do the tests and benches that build a trainer in their own process.
"""

from __future__ import annotations

import logging

_installed: list[bool] = []


def install_process(torch_threads: int = 1) -> None:
    """One torch thread per client actor and quiet RLlib build logs."""
    if _installed:
        return
    import torch

    # A client trains on one CPU. Torch's default (one thread per core) oversubscribes the
    # cores shared with Ray's processes: measured 20 s instead of 0.5 s per PPO iteration.
    torch.set_num_threads(torch_threads)
    # RLlib warns on every build that PPO runs on the new API stack, which is what we want.
    logging.getLogger("ray.rllib.algorithms.algorithm_config").setLevel(logging.ERROR)
    _installed.append(True)
