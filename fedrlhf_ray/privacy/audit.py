"""The leakage audit's attacks: an honest-but-curious server attacks each client with what it received.

The audit (``fedrlhf_ray.leakage_audit``) runs an experiment's first round(s) with a driver that,
after each round, plays the server. It sees two things, exactly as the driver has them:

* **update** — what the client actor sent for that client (its shared weights);
* **release** — the new global model the round published (under DP: the noised aggregate).

and attacks each client in two ways:

* **membership of its rated items**: rank the rows of the item-embedding table by how far the
  view moved them from the round's global model, and score that ranking against the items
  the client's users trained on — ROC AUC (0.5 = chance; from the Mann–Whitney U statistic),
  the test's one-sided p-value (how likely an attack at chance would score this well: AUC
  alone swings by about 1/√(12n) with n members, so a small client's chance AUC can sit well
  off 0.5) and precision@n with n the number of those items, next to the base rate n / items;
* **reconstruction**: the cosine similarity of the view's change of the model with the
  client's true update (1 for the plain update itself).

The ground truth (which items a client's users rated) is read from the data by the audit, in
the driver's process, to score the attack; the attack itself uses only the view. Results are
round metrics ``audit/<view>/<measure>/mean`` and per-client rows of kind ``audit``, so they land
in ``metrics.jsonl``, ``client_metrics.jsonl`` and MLflow like every other metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import mannwhitneyu

from fedrlhf_ray.local_trainer import ClientUpdate, MaskedUpdate, Weights
from fedrlhf_ray.metrics import cosine_similarity
from fedrlhf_ray.privacy.client_dp import UNCLIPPED_KEY
from fedrlhf_ray.privacy.secagg import dequantize
from fedrlhf_ray.privacy.secure_round import unflatten


def row_changes(before: np.ndarray, view: np.ndarray) -> np.ndarray:
    """L2 distance per row (axis 0) between two versions of a table, padding row 0 left out."""
    diff = np.asarray(view, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    return np.linalg.norm(diff.reshape(diff.shape[0], -1), axis=1)[1:]


def membership_attack(scores: np.ndarray, members: np.ndarray) -> dict[str, float]:
    """How well ``scores`` (one per item) rank the ``members`` (bool per item) first."""
    members = np.asarray(members, dtype=bool)
    n, total = int(members.sum()), members.size
    if n in (0, total):
        raise ValueError(f"membership needs members and non-members, got {n} of {total}")
    test = mannwhitneyu(scores[members], scores[~members], alternative="greater")
    # Ties (e.g. rows nobody moved) break in no one's favour: rank them at random but seeded.
    jitter = np.random.default_rng(0).random(total) * 1e-12 * (np.abs(scores).max() + 1.0)
    top = np.argsort(-(scores + jitter), kind="stable")[:n]
    return {
        "auc": float(test.statistic / (n * (total - n))),
        "p_value": float(test.pvalue),
        "precision_at_n": float(members[top].mean()),
        "base_rate": n / total,
        "members": float(n),
    }


def cosine(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """Cosine similarity of two weight changes over their common keys (0 if either is 0)."""
    keys = sorted(set(a) & set(b))
    x = np.concatenate([np.asarray(a[k], dtype=np.float64).ravel() for k in keys])
    y = np.concatenate([np.asarray(b[k], dtype=np.float64).ravel() for k in keys])
    return cosine_similarity(x, y)


def change(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> Weights:
    """after − before over their common keys, in float64."""
    return {k: np.asarray(after[k], np.float64) - np.asarray(before[k], np.float64) for k in after if k in before}


def read_as_weights(update: ClientUpdate | MaskedUpdate, shared: Mapping[str, np.ndarray]) -> Weights:
    """A client's update as the server can read it: its weights, or a masked vector read as
    weights (without its weight, the masked metrics, and DP's not-clipped bit if it carries one)."""
    if isinstance(update, ClientUpdate):
        return dict(update.weights)
    flat = dequantize(update.masked[: update.masked.size - 1 - 2 * len(update.names)], 0)
    with_bit = flat.size > sum(np.size(v) for v in shared.values())
    seen = unflatten(flat, {**shared, UNCLIPPED_KEY: np.zeros(1)} if with_bit else dict(shared))
    seen.pop(UNCLIPPED_KEY, None)
    return seen


def audit_round(
    before: Mapping[str, np.ndarray],
    release: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate | MaskedUpdate],
    rated: Mapping[int, np.ndarray],
    table: str,
) -> list[dict[str, float]]:
    """One row per client of ``updates``: each attack on each view (see the module docstring).
    ``rated[c]``: bool per item (rows 1..n of ``table``) of the items client c's users trained on.

    A masked update is attacked as the weights it would be read as. Its cosine with the true
    update is what the client itself scored (``audit/update/cosine`` in its metrics, the
    true update never leaving it); the release's cosine is then not known to the server."""
    rows = []
    released = change(before, release)
    shared = {k: before[k] for k in release}
    for update in updates:
        row: dict[str, float] = {"client": float(update.client_id)}
        seen = read_as_weights(update, shared)
        true = None if isinstance(update, MaskedUpdate) else change(before, update.weights)
        for view, weights in (("update", seen), ("release", release)):
            attack = membership_attack(row_changes(before[table], weights[table]), rated[update.client_id])
            row.update({f"audit/{view}/{k}": v for k, v in attack.items() if k in ("auc", "p_value", "precision_at_n")})
            if true is not None:
                row[f"audit/{view}/cosine"] = cosine(true, true if view == "update" else released)
        if true is None:
            row["audit/update/cosine"] = float(update.metrics.get("audit/update/cosine", float("nan")))
        row["audit/base_rate"] = attack["base_rate"]
        rows.append(row)
    return rows
