"""Byzantine clients on the synthetic RLHF world: robust strategies hold, FedAvg does not.

The quickstart world and config (5 clients of 4 users, λ = 1) for 5 rounds, real RLlib PPO in
Ray client actors. One client in five (20 %) is malicious: it scales its update ×10 (scale) or flips
its sign (sign_flip). A robust strategy is compared with its own clean run, because robust
aggregation has a price on non-IID clients even without attackers. The README's attack table
has every strategy × attack; these are the claims it makes that a test holds to:

* FedAvg loses more than 0.1 liked-hit under either attack (measured 0.165 and 0.121);
* the median ignores a ×10 attacker (within 0.05 of its clean run; measured +0.027);
* Multi-Krum keeps within 0.05 of its clean run under a sign flip (measured +0.018), which
  coordinate-wise median and trimmed mean do not (the flipped values lie within the honest range).
"""

from __future__ import annotations

import pytest

ATTACKS = {"sign_flip": ["attack.kind=sign_flip"], "scale": ["attack.kind=scale", "attack.scale=10"]}
STRATEGIES = {
    "fedavg": ["federation.strategy=fedavg"],
    "median": ["federation.strategy=median"],
    "multi_krum": ["federation.strategy=multi_krum", "federation.multi_krum_selected=4"],
}


@pytest.fixture(scope="module")
def liked_hit(quickstart_runs):
    """The final mean liked-hit rate of the quickstart, 5 rounds, under a strategy and an attack
    (or none)."""

    def final(strategy: str, attack: str | None) -> float:
        result = quickstart_runs("federation.rounds=5", *STRATEGIES[strategy], *(ATTACKS[attack] if attack else []))
        return float(result.final["eval/liked_hit_rate/mean"])

    return final


@pytest.mark.slow
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_fedavg_degrades_under_attack(liked_hit, attack):
    clean, attacked = liked_hit("fedavg", None), liked_hit("fedavg", attack)
    assert attacked < clean - 0.10, (clean, attacked)


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "attack"), [("median", "scale"), ("multi_krum", "sign_flip")])
def test_robust_strategies_stay_near_their_clean_run(liked_hit, strategy, attack):
    clean, attacked = liked_hit(strategy, None), liked_hit(strategy, attack)
    assert attacked >= clean - 0.05, (strategy, clean, attacked)
    fedavg_loss = liked_hit("fedavg", None) - liked_hit("fedavg", attack)
    assert clean - attacked < fedavg_loss - 0.1, (strategy, clean - attacked, fedavg_loss)
