"""A driver that deviates in what it sends the real client hosts: each client enforces the
privacy settings it was created with and refuses, in one line, before anything of its update
leaves (issue 18's malicious-driver harness for the instructions, thresholds and active sets)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedrlhf_ray.client import ClientHost
from fedrlhf_ray.config import validate_config
from fedrlhf_ray.driver import FederatedDriver
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.experiment import run_experiment
from fedrlhf_ray.local_trainer import ClientDP, RoundInstructions
from fedrlhf_ray.privacy.client_policy import ClientPolicy, ClientRefused, evaluation_digest, round_input_digest
from fedrlhf_ray.privacy.dp import round_step
from fedrlhf_ray.torch_trainer import MLPTrainerFactory, mlp_trainer_factory

K, SEED = 6, 2
SIGMA, CLIP = 1.2, 0.5


def config(**privacy):
    return validate_config({
        "seed": SEED, "clients": {"num_clients": K}, "federation": {"rounds": 2, "sparse_rows": False},
        "ray": {"num_workers": 1}, "tracking": {"enabled": False}, "privacy": privacy,
    })


DISTRIBUTED = {"dp": {"enabled": True, "mode": "distributed", "noise_multiplier": SIGMA, "clip_norm": CLIP}}


@pytest.fixture
def host(tmp_path):
    def make(cfg) -> ClientHost:
        return ClientHost(MLPTrainerFactory(K, 0, 1, seed=SEED), str(tmp_path / "store"), (), None,
                          ClientPolicy.from_config(cfg))

    return make


def honest_dp(m: int = K) -> RoundInstructions:
    _, update_noise, _ = round_step(SIGMA, K, K, False, None)
    return RoundInstructions(dp=ClientDP(clip=CLIP, noise_stddev=update_noise * CLIP / math.sqrt(m)))


def nothing_stored(tmp_path) -> bool:
    return not list((tmp_path / "store").rglob("round-*.npz"))


@pytest.mark.parametrize("lie", [
    RoundInstructions(),  # no DP at all
    RoundInstructions(dp=ClientDP(clip=CLIP, noise_stddev=0.0)),  # σ = 0
    RoundInstructions(dp=ClientDP(clip=CLIP, noise_stddev=0.5 * SIGMA * CLIP / math.sqrt(K))),  # half σ
    RoundInstructions(dp=ClientDP(clip=100 * CLIP, noise_stddev=SIGMA * CLIP / math.sqrt(K))),  # C × 100, same noise
    RoundInstructions(dp=ClientDP(clip=float("inf"), noise_stddev=1.0)),
    RoundInstructions(dp=ClientDP(clip=CLIP, noise_stddev=float("nan"))),
])
def test_distributed_dp_clients_refuse_weaker_noise_than_their_own_settings(host, tmp_path, lie):
    client = host(config(**DISTRIBUTED))
    weights = client.initial_weights()
    with pytest.raises(ClientRefused) as info:
        client.train_client(1, 0, weights, lie, keep_from=0)
    assert "client 0 refused round 1" in str(info.value) and "\n" not in str(info.value)
    assert nothing_stored(tmp_path)


def test_the_honest_share_passes_for_every_cohort_up_to_k(host):
    client = host(config(**DISTRIBUTED))
    weights = client.initial_weights()
    for m in (3, K):  # Poisson sampling: fewer clients each add more
        update = client.train_client(m, 0, weights, honest_dp(m), keep_from=0)
        assert update.client_id == 0


def test_adaptive_clipping_clients_refuse_a_noiseless_count(host):
    cfg = config(dp={**DISTRIBUTED["dp"], "adaptive_clipping": True, "clipped_count_stddev": 3.0})
    client = host(cfg)
    _, update_noise, count = round_step(SIGMA, K, K, True, 3.0)
    dp = ClientDP(clip=CLIP, noise_stddev=update_noise * CLIP / math.sqrt(K), count=True, count_stddev=count / math.sqrt(K))
    client.train_client(1, 0, client.initial_weights(), RoundInstructions(dp=dp), keep_from=0)
    with pytest.raises(ClientRefused, match="count's noise"):
        client.train_client(2, 0, client.initial_weights(), RoundInstructions(dp=dataclasses.replace(dp, count_stddev=0.0)), 0)


def _digest(client: ClientHost) -> str:
    """What an honest driver announces for a round trained from the initial weights, no DP."""
    return round_input_digest(client.initial_weights(), RoundInstructions())


def _secagg_round(client: ClientHost, ids: list[int], threshold: int, r: int = 1, digest: str | None = None):
    """Keys and sealed shares of session ``r`` among ``ids`` (K = 6: everyone's neighbour)."""
    client.register(0, ids)
    keys = client.secagg_keys(r, ids, _digest(client) if digest is None else digest)
    neighbours = {c: {j: keys[j] for j in ids if j != c} for c in ids}
    return keys, neighbours, client.secagg_shares(r, ids, neighbours, threshold, ids)


def _held(sealed, ids):
    return {c: {s: blobs[c] for s, blobs in sealed.items() if c in blobs} for c in ids}


def test_secure_aggregation_clients_never_send_an_unmasked_update(host, tmp_path):
    client = host(config(secure_aggregation=True))
    with pytest.raises(ClientRefused, match="never sends an unmasked update"):
        client.train_client(1, 0, client.initial_weights(), RoundInstructions(), keep_from=0)
    assert nothing_stored(tmp_path)


@pytest.mark.parametrize("threshold", [1, 2, 3, 6])
def test_a_share_threshold_below_the_rule_or_above_the_neighbours_is_refused(host, threshold):
    client = host(config(secure_aggregation=True))
    ids = list(range(K))  # 5 neighbours each: the rule asks for 3 to 5
    with pytest.raises(ClientRefused, match="share threshold"):
        if threshold == 3:  # the least allowed passes: a lower one (below) is what fails
            _secagg_round(client, ids, threshold)
            raise ClientRefused("share threshold accepted as it should be")
        _secagg_round(client, ids, threshold)


def test_an_active_set_that_disagrees_with_the_held_shares_is_refused(host, tmp_path):
    client = host(config(secure_aggregation=True))
    ids = list(range(K))
    _, _, sealed = _secagg_round(client, ids, 3)
    held = _held(sealed, ids)
    weights = client.initial_weights()
    for active in ([], [0], ids[:3]):  # no pair masks; or fewer than the shares it holds
        with pytest.raises(ClientRefused, match="active neighbours"):
            client.train_masked(1, [0], weights, RoundInstructions(), 0, held, active, 24)
    assert nothing_stored(tmp_path)
    sent = client.train_masked(1, [0], weights, RoundInstructions(), 0, held, ids, 24)  # the honest round
    assert [u.client_id for u in sent] == [0]


def test_a_client_sends_one_masked_input_per_round_ever(host, tmp_path):
    """A driver that runs round 1 again (new keys, another client set) to difference the two
    sums, or goes back to an earlier round, is refused; so is a damaged note of what was sent."""
    client = host(config(secure_aggregation=True))
    ids = list(range(K))
    weights = client.initial_weights()

    def masked_round(r, ids):
        _, _, sealed = _secagg_round(client, ids, len(ids) // 2 + 1, r, round_input_digest(weights, RoundInstructions()))
        return client.train_masked(r, [0], weights, RoundInstructions(), 0, _held(sealed, ids), ids, 24)

    assert [u.client_id for u in masked_round(2, ids)] == [0]
    for r, again in ((2, ids[:5]), (1, ids)):
        with pytest.raises(ClientRefused, match=r"already sent a masked input for round 2, and a round runs once"):
            masked_round(r, again)
    assert [u.client_id for u in masked_round(3, ids)] == [0]
    note = tmp_path / "store" / "client-000000" / "sent-round"
    assert note.read_text() == "3\n" and note.stat().st_mode & 0o777 == 0o600
    note.write_text("three")
    with pytest.raises(ClientRefused, match="note of the rounds it sent is damaged"):
        masked_round(4, ids)


def _driver_keys():
    """Key pairs a deviating driver makes for itself, and its own signing key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedrlhf_ray.privacy.secagg import MaskingClient

    return MaskingClient(99, 1).public_keys(), Ed25519PrivateKey.generate()


def test_keys_the_driver_substitutes_for_a_neighbours_are_refused_before_any_share_leaves(host):
    from fedrlhf_ray.privacy.pki import advertisement

    client = host(config(secure_aggregation=True))
    ids = list(range(K))
    client.register(0, ids)
    digest = _digest(client)
    keys = client.secagg_keys(1, ids, digest)
    (mask_pk, channel_pk), own = _driver_keys()
    for forged in (
        (mask_pk, channel_pk, keys[3][2]),  # client 3's signature over other keys
        (mask_pk, channel_pk, own.sign(advertisement(1, 3, mask_pk, channel_pk, digest))),  # signed by the driver
        keys[4],  # client 4's genuine advertisement, relayed as client 3's
        (*keys[3][:2], own.sign(advertisement(2, 3, *keys[3][:2], digest))[:10]),  # garbage
    ):
        neighbours = {c: {j: keys[j] for j in ids if j != c} for c in ids}
        neighbours[0][3] = forged
        with pytest.raises(ClientRefused, match="client 3's key advertisement is not signed by its registered identity"):
            client.secagg_shares(1, ids, neighbours, 3, ids)
    # The round's keys are bound to the round: last round's advertisement does not pass either.
    later = client.secagg_keys(2, ids, digest)
    neighbours = {c: {j: (keys if j == 3 else later)[j] for j in ids if j != c} for c in ids}
    with pytest.raises(ClientRefused, match="client 3's key advertisement"):
        client.secagg_shares(2, ids, neighbours, 3, ids)


def test_a_client_registers_one_identity_and_refuses_a_neighbour_without_one(host, tmp_path):
    client = host(config(secure_aggregation=True))
    ids = list(range(K))
    client.register(0, ids[:5])  # client 5 never registered
    keys = client.secagg_keys(1, ids, _digest(client))
    neighbours = {c: {j: keys[j] for j in ids if j != c} for c in ids}
    with pytest.raises(ClientRefused, match="client 5 has no registered key"):
        client.secagg_shares(1, ids, neighbours, 3, ids)
    registry = tmp_path / "store" / "pki"
    (registry / "client-000001.ed25519").write_bytes(bytes(32))  # another key for client 1
    with pytest.raises(ClientRefused, match="the registry holds another key for client 1"):
        client.register(0, [1])
    identity = tmp_path / "store" / "client-000000" / "identity.key"
    assert identity.stat().st_mode & 0o777 == 0o600


def test_neighbours_other_than_the_public_seed_gives_are_refused(host):
    from fedrlhf_ray.privacy.secagg import round_graph

    client = host(config(secure_aggregation=True, secagg_neighbours=2))
    ids = list(range(K))
    client.register(0, ids)
    keys = client.secagg_keys(1, ids, "")
    graph = round_graph(ids, 2, SEED, 1)
    honest = {c: {j: keys[j] for j in graph[c]} for c in ids}
    client.secagg_shares(1, ids, honest, 2, ids)
    keys = client.secagg_keys(2, ids, "")
    graph = round_graph(ids, 2, SEED, 2)
    picked = {c: {j: keys[j] for j in graph[c]} for c in ids}
    outsider = next(j for j in ids if j not in graph[0] and j != 0)
    picked[0] = {graph[0][0]: keys[graph[0][0]], outsider: keys[outsider]}  # the driver picks 0's neighbours
    with pytest.raises(ClientRefused, match="its neighbours are not the ones the round's public seed gives it"):
        client.secagg_shares(2, ids, picked, 2, ids)


def test_survivor_sets_that_differ_between_clients_get_no_share_revealed(host):
    """The consistency round: the driver tells clients 0–2 that everyone survived and clients
    3–4 that client 5 dropped, hoping for client 5's self-mask seed from the first and its mask
    key from the second. Each client signs one set and reveals only when its threshold of
    neighbours signed the same set, so the second group reveals nothing."""
    from fedrlhf_ray.privacy.pki import survivor_set

    client = host(config(secure_aggregation=True))
    ids = list(range(K))
    _, _, sealed = _secagg_round(client, ids, 3)
    weights = client.initial_weights()
    client.train_masked(1, ids, weights, RoundInstructions(), 0, _held(sealed, ids), ids, 24)
    everyone, without_5 = ids, ids[:5]
    told = {**client.secagg_confirm(1, [0, 1, 2, 5], everyone), **client.secagg_confirm(1, [3, 4], without_5)}
    with pytest.raises(ClientRefused, match="already confirmed another survivor set"):
        client.secagg_confirm(1, [0], without_5)
    _, own = _driver_keys()
    forged = {j: own.sign(survivor_set(1, without_5)) for j in (0, 1, 2)}  # not theirs
    for c in (3, 4):
        signatures = {c: {**{j: told[j] for j in (3, 4) if j != c}, **forged}}
        with pytest.raises(ClientRefused, match="1 of its neighbours signed the survivor set it confirmed, it needs 3"):
            client.secagg_reveal(1, [c], without_5, signatures)
    with pytest.raises(ClientRefused, match="not the one it confirmed"):
        client.secagg_reveal(1, [3], everyone, {3: {j: told[j] for j in (0, 1, 2, 5)}})


def test_the_honest_consistency_round_reveals_and_refuses_a_client_that_sent_nothing(host):
    client = host(config(secure_aggregation=True))
    ids = list(range(K))
    _, _, sealed = _secagg_round(client, ids, 3)
    with pytest.raises(ClientRefused, match="sent no masked input this round"):
        client.secagg_confirm(1, [0], ids)
    client.train_masked(1, ids, client.initial_weights(), RoundInstructions(), 0, _held(sealed, ids), ids, 24)
    signed = client.secagg_confirm(1, ids, ids)
    revealed = client.secagg_reveal(1, ids, ids, {c: {j: signed[j] for j in ids if j != c} for c in ids})
    assert sorted(revealed) == ids and all(kind == "b" for r in revealed.values() for kind, _ in r.values())


def test_a_client_evaluates_only_inside_a_secure_sum_the_model_its_neighbours_announced(host):
    """Under secure aggregation or DP: held-out metrics never leave in the clear; a masked
    evaluation is of the model the session announced (a driver sending one client crafted
    weights to probe its held-out items is refused), its neighbours announced the same one, and
    a round is evaluated once."""
    from fedrlhf_ray.privacy.secagg import evaluation_session

    for settings in ({"secure_aggregation": True}, DISTRIBUTED):
        with pytest.raises(ClientRefused, match="refused to evaluate round 1 in the clear"):
            host(config(**settings)).evaluate_clients(1, [0], host(config()).initial_weights())
        # Nor does any text of a client's own model leave (the IMDb task's samples).
        with pytest.raises(ClientRefused, match="refused to evaluate round 1 in the clear"):
            host(config(**settings)).client_samples(1, [0], host(config()).initial_weights())
    assert host(config()).client_samples(1, [0, 1], host(config()).initial_weights()) == [None, None]
    client = host(config(secure_aggregation=True))
    ids = list(range(K))
    weights = client.initial_weights()
    crafted = {k: v + 0.5 for k, v in weights.items()}
    digest, session = evaluation_digest(weights, 0), evaluation_session(1)

    def evaluation(sent_weights, digest=digest, r=1):
        _, _, sealed = _secagg_round(client, ids, 3, evaluation_session(r), digest)
        return client.evaluate_masked(evaluation_session(r), [0], sent_weights, 0, r, _held(sealed, ids), ids, 24)

    with pytest.raises(ClientRefused, match="not the ones the session announced"):
        evaluation(crafted)
    # Neighbours that announced another model: client 0 cannot verify their advertisements.
    client.register(0, ids)
    keys = client.secagg_keys(session, ids[1:], digest)
    keys.update(client.secagg_keys(session, [0], evaluation_digest(crafted, 0)))
    with pytest.raises(ClientRefused, match="key advertisement is not signed"):
        client.secagg_shares(session, [0], {0: {j: keys[j] for j in ids[1:]}}, 3, ids)
    (sent,) = evaluation(weights)
    assert sent.names and len(sent.masked) == 2 * len(sent.names) and not sent.metrics
    with pytest.raises(ClientRefused, match="already sent a masked evaluation for round 1"):
        evaluation(weights)
    evaluation(weights, r=2)


class SigmaZeroDriver(FederatedDriver):
    """A deviating driver: it tells the clients to add no noise, and would report ε as usual."""

    def instructions(self, plan):
        told = super().instructions(plan)
        return dataclasses.replace(told, dp=dataclasses.replace(told.dp, noise_stddev=0.0))


def test_a_run_whose_driver_lies_about_sigma_fails_in_one_line_with_nothing_left(ray_session, tmp_path):
    cfg = config(**DISTRIBUTED)
    with pytest.raises(UserError) as info:
        run_experiment(cfg, run_dir=tmp_path / "run", trainer_factory=mlp_trainer_factory(K, seed=SEED),
                       driver_cls=SigmaZeroDriver, in_process_driver=True)
    message = str(info.value)
    assert "refused round 1" in message and "below its floor" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
    # The honest driver of the same config runs.
    result = run_experiment(cfg, run_dir=tmp_path / "honest", trainer_factory=mlp_trainer_factory(K, seed=SEED))
    assert result.status == "completed" and np.isfinite(result.summary["privacy"]["epsilon"])


def test_a_round_is_trained_again_only_from_the_same_model_and_instructions(host):
    """A retry or resume repeats a round exactly; a driver that replays round r with another
    model (to difference two updates carrying the same noise) is refused."""
    client = host(config(**DISTRIBUTED))
    weights = client.initial_weights()
    first = client.train_client(1, 0, weights, honest_dp(), keep_from=0)
    again = client.train_client(1, 0, weights, honest_dp(), keep_from=0)  # an honest retry
    assert all(np.array_equal(first.weights[k], again.weights[k]) for k in first.weights)
    crafted = {k: v + 0.01 for k, v in weights.items()}
    with pytest.raises(ClientRefused, match="already trained that round from another global model"):
        client.train_client(1, 0, crafted, honest_dp(), keep_from=0)
    with pytest.raises(ClientRefused, match="already trained that round"):
        client.train_client(1, 0, weights, honest_dp(m=3), keep_from=0)
    client.train_client(2, 0, crafted, honest_dp(), keep_from=0)  # the next round starts anew


# -- the audit's deviating server (privacy.deviations), played against in-process client hosts --


class InProcess:
    """The host pool's calls on one client host in this process (a collector without Ray)."""

    def __init__(self, host: ClientHost) -> None:
        self.host = host

    def by_host(self, ids):
        return {0: list(ids)}

    def call_once(self, method, r, groups, args):
        return {h: getattr(self.host, method)(r, ids, *args.get(h, ())) for h, ids in groups.items()}

    def call(self, method, r, groups, *rest):
        return {h: getattr(self.host, method)(r, ids, *rest) for h, ids in groups.items()}, []


SECURE_LIES = ("active-set", "low-threshold", "key-substitution", "replay")


def _deviate(client: ClientHost, attack: str, cfg, instructions=None):
    """One round of ``attack`` against ``client``'s K clients: what the deviating server learned."""
    from fedrlhf_ray import privacy
    from fedrlhf_ray.collectors import PlainCollector, RoundSpent
    from fedrlhf_ray.privacy.deviations import ATTACKS

    secure = privacy.secure_collector(cfg)
    deviation = ATTACKS[attack](secure or PlainCollector(None, 1), secure)
    ids = list(range(K))
    if cfg.privacy.secure_aggregation and cfg.privacy.secagg_adversary == "malicious":
        client.register(0, ids)
    weights = client.initial_weights()
    told = deviation.told(instructions or RoundInstructions())
    with pytest.raises(RoundSpent):
        deviation.collect(InProcess(client), 1, ids, weights, told, weights, 0, round_input_digest(weights, told))
    return deviation.learned


@pytest.mark.parametrize("adversary", ["malicious", "honest_but_curious"])
@pytest.mark.parametrize("attack", SECURE_LIES)
def test_the_audits_deviating_server_is_refused_by_every_secure_aggregation_client(host, tmp_path, attack, adversary):
    """Each lie of ``fedrlhf audit --deviate`` against real client hosts: refused in one line
    before the client's update can be read, in both modes, except the key substitution that the
    honest-but-curious mode (no identities) does not claim to withstand."""
    learned = _deviate(host(config(secure_aggregation=True, secagg_adversary=adversary)), attack,
                       config(secure_aggregation=True, secagg_adversary=adversary))
    if attack == "key-substitution" and adversary == "honest_but_curious":
        assert not learned.refusal and sorted(learned.updates) == list(range(K))
        return
    assert learned.refusal.startswith("client ") and "\n" not in learned.refusal
    assert not learned.updates


@pytest.mark.parametrize("attack", SECURE_LIES)
def test_without_the_clients_checks_each_lie_gives_the_server_every_update(host, tmp_path, monkeypatch, attack):
    """The attacks are real: a client whose policy checks nothing (each ``check_*`` a no-op)
    hands the deviating server every client's exact update."""
    for name in [n for n in dir(ClientPolicy) if n.startswith("check_")]:
        monkeypatch.setattr(ClientPolicy, name, lambda *args, **kwargs: None)
    cfg = config(secure_aggregation=True, secagg_adversary="honest_but_curious")
    learned = _deviate(host(cfg), attack, cfg)
    assert not learned.refusal and sorted(learned.updates) == list(range(K))
    honest = ClientHost(MLPTrainerFactory(K, 0, 1, seed=SEED), str(tmp_path / "other"), (), None,
                        ClientPolicy.from_config(config()))
    weights = honest.initial_weights()
    for c, recovered in learned.updates.items():
        true = honest.train_client(1, c, weights, RoundInstructions(), keep_from=0).weights
        assert sorted(recovered) == sorted(true)
        assert all(np.allclose(recovered[k], true[k], atol=1e-5) for k in true), (attack, c)


def test_the_deviating_servers_sigma_zero_and_crafted_evaluation_are_refused_under_dp(host):
    from fedrlhf_ray.privacy.deviations import CraftedEvaluation, craft

    learned = _deviate(host(config(**DISTRIBUTED)), "sigma-zero", config(**DISTRIBUTED), honest_dp())
    assert "below its floor" in learned.refusal and not learned.updates
    for settings in ({"secure_aggregation": True}, DISTRIBUTED, {}):
        client = host(config(**settings))
        probe = CraftedEvaluation(None, None)  # type: ignore[arg-type]
        probe.probe(InProcess(client), 1, list(range(K)), craft(client.initial_weights(), 0), 0)
        if settings:
            assert "refused to evaluate round 1 in the clear" in probe.learned.refusal
            assert not probe.learned.evaluations
        else:  # no privacy mode: per-client metrics of any model the driver sends
            assert sorted(probe.learned.evaluations) == list(range(K))
