"""The language-model policy as an RLlib RLModule, and PPO's learner with a KL penalty to the reference.

:class:`LMPolicyModule` wraps a causal LM (initialised from the pre-trained reference) with a value
head on its last hidden state; the next-token logits at the last real position of the observation
window are the ``Discrete(V)`` action distribution's inputs. The frozen reference travels with the
module but is not one of its parameters (it is neither trained nor federated): it gives the
reference logits for the KL term.

:class:`TextPPOLearner` puts the KL penalty in the reward, in the reward's units, as Ziegler et
al. do: before GAE, each generated token's reward gets −β·(log π(a_t) − log π_ref(a_t)), the
sampled estimate of KL(π ‖ π_ref) at that position (:class:`KLPenaltyInReward`). Advantages are
standardised after that, so the penalty and the task's reward are weighed on one scale; added to
the loss instead, β·KL was not standardised with them and KL grew every round. The full
distributions' KL at each position is logged (``kl_to_reference``).
"""

from __future__ import annotations

import copy
import functools
from typing import Any, cast

import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner.general_advantage_estimation import GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from fedrlhf_ray.rllib_edge import ProximalPPOLearner

REFERENCE_LOGITS = "reference_logits"
KL_METRIC = "kl_to_reference"

# One copy of each LM per process: the env runner's module, the learner's module and the envs'
# fluency scorer all start from the same weights, read once. Bounded: a process that serves
# runs one after another (a Tune worker) keeps only the latest two.
@functools.lru_cache(maxsize=2)
def cached_lm(source: tuple[str, str]) -> Any:
    """The :class:`~fedrlhf_ray.tasks.text.lm.LanguageModel` of ``("prepared", folder)`` or ``("pretrained", name)``."""
    from pathlib import Path

    from fedrlhf_ray.tasks.text.lm import load_prepared, load_pretrained

    kind, where = source
    return load_prepared(Path(where)) if kind == "prepared" else load_pretrained(where)


def _no_dropout(model: nn.Module) -> nn.Module:
    # PPO's ratio compares two forward passes of the same policy: dropout would make them differ.
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


class LMPolicyModule(TorchRLModule, ValueFunctionAPI):
    """``model_config``: ``source`` (see :func:`cached_lm`)."""

    def setup(self) -> None:
        cfg = cast(dict[str, Any], self.model_config)
        lm = cached_lm(tuple(cfg["source"]))
        self.lm = _no_dropout(copy.deepcopy(lm.model))
        self.lm.train()
        reference = _no_dropout(copy.deepcopy(lm.model)).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        # In a tuple, the reference is not registered as a submodule: not in state_dict(), not federated.
        self._reference = (reference,)
        lm_config: Any = self.lm.config
        self.value_head = nn.Linear(int(lm_config.hidden_size), 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        # GPT-2 ties its output layer to the token embedding: state_dict() lists the one tensor
        # under both names. Only the first is shared, or DP noise and clipping would count it twice
        # and the two copies would disagree on the way back.
        first: dict[int, str] = {}
        self._tied: dict[str, str] = {}  # duplicate name -> the name that is shared
        for name, tensor in self.state_dict(keep_vars=True).items():
            if tensor.data_ptr() in first:
                self._tied[name] = first[tensor.data_ptr()]
            first.setdefault(tensor.data_ptr(), name)

    def get_state(self, *args: Any, **kwargs: Any) -> Any:
        state = super().get_state(*args, **kwargs)
        for name in self._tied:
            state.pop(name, None)
        return state

    def set_state(self, state: Any) -> None:
        state = dict(state)
        for name, source in self._tied.items():
            if source in state:
                state[name] = state[source]
        super().set_state(state)

    @property
    def reference(self) -> nn.Module:
        return self._reference[0]

    @staticmethod
    def _last(hidden: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        index = (length.reshape(-1).long() - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0]), index]

    def _hidden(self, model: Any, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        # Left-aligned windows under causal attention: the padding after the last real token is
        # never attended to from it, so no attention mask is needed.
        out = model.base_model(input_ids=obs["tokens"].long())
        return self._last(out.last_hidden_state, obs["length"])

    def _logits(self, model: Any, hidden: torch.Tensor) -> torch.Tensor:
        return model.get_output_embeddings()(hidden).float()

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        hidden = self._hidden(self.lm, batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: self._logits(self.lm, hidden)}

    @torch.no_grad()
    def reference_logits(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._logits(self.reference, self._hidden(self.reference, obs))

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        hidden = self._hidden(self.lm, obs)
        reference = self.reference_logits(obs)
        return {
            Columns.ACTION_DIST_INPUTS: self._logits(self.lm, hidden),
            Columns.EMBEDDINGS: hidden,
            REFERENCE_LOGITS: reference,
        }

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        if embeddings is None:
            embeddings = self._hidden(self.lm, batch[Columns.OBS])
        return self.value_head(embeddings).squeeze(-1)


def categorical_kl(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """KL(π ‖ π_ref) of the next-token distributions, per row."""
    logp = torch.log_softmax(logits, dim=-1)
    logq = torch.log_softmax(reference_logits, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def token_kl_penalty(action_logp: torch.Tensor, reference_logits: torch.Tensor, actions: torch.Tensor,
                     beta: float) -> torch.Tensor:
    """−β·(log π(a_t) − log π_ref(a_t)) per row: the reward the KL penalty adds to each token."""
    reference_logp = torch.log_softmax(reference_logits, dim=-1).gather(-1, actions.long().reshape(-1, 1))
    return -beta * (action_logp.reshape(-1) - reference_logp.reshape(-1))


class KLPenaltyInReward(ConnectorV2):
    """Learner connector piece, before GAE: adds :func:`token_kl_penalty` to each real timestep's
    reward (not to the bootstrap step RLlib appends to each episode, which the loss mask marks)."""

    def __init__(self, coeff: Any, input_observation_space: Any = None, input_action_space: Any = None) -> None:
        super().__init__(input_observation_space, input_action_space)
        self.coeff = coeff  # () -> β: the learner's current β

    def __call__(self, *, rl_module: Any, batch: dict[str, Any], episodes: Any, **kwargs: Any) -> Any:
        beta = float(self.coeff())
        if beta == 0.0:
            return batch
        for module_id, module_batch in batch.items():
            reference = rl_module[module_id].reference_logits(module_batch[Columns.OBS])
            logp, actions = module_batch[Columns.ACTION_LOGP], module_batch[Columns.ACTIONS]
            penalty = token_kl_penalty(logp, reference, actions, beta)
            if Columns.LOSS_MASK in module_batch:
                penalty = penalty * module_batch[Columns.LOSS_MASK].to(penalty.dtype)
            rewards = module_batch[Columns.REWARDS]
            module_batch[Columns.REWARDS] = rewards + penalty.to(rewards.dtype)
        return batch


class TextPPOLearner(ProximalPPOLearner):
    """PPO (+ FedProx) with the KL penalty to the reference in the reward (:class:`KLPenaltyInReward`);
    β is set per client before each round."""

    def build(self) -> None:
        super().build()
        self._kl_coeff = 0.0
        if self._learner_connector is not None:
            self._learner_connector.insert_before(GeneralAdvantageEstimation, KLPenaltyInReward(lambda: self._kl_coeff))

    def set_kl_coeff(self, beta: float) -> None:
        self._kl_coeff = float(beta)

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        kl = categorical_kl(fwd_out[Columns.ACTION_DIST_INPUTS], fwd_out[REFERENCE_LOGITS])
        if Columns.LOSS_MASK in batch:
            mask = batch[Columns.LOSS_MASK]
            mean_kl = torch.sum(kl[mask]) / torch.sum(mask).clamp(min=1)
        else:
            mean_kl = kl.mean()
        self.metrics.log_dict({KL_METRIC: mean_kl.detach()}, key=module_id, window=1)
        return loss
