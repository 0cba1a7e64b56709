"""A causal language model with its tokenizer: the policy's initialisation and the frozen reference.

Two sources: the small GPT-2 that ``fedrlhf prepare imdb`` pre-trains (a folder in the cache), or a
Hugging Face model given by ``lm.pretrained`` (a folder, or a name already in the local Hugging Face
cache; nothing is downloaded). Weights are read from safetensors only: a model folder a user points
at is never unpickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrlhf_ray.errors import UserError

END_OF_TEXT = "<|endoftext|>"


def clean_review(text: str) -> str:
    """IMDb reviews carry HTML line breaks; the models see plain text."""
    return " ".join(text.replace("<br />", " ").split())


@dataclass
class LanguageModel:
    """A tokenizer (Hugging Face ``tokenizers``) and a causal LM over its vocabulary."""

    tokenizer: Any  # tokenizers.Tokenizer
    model: Any  # a transformers PreTrainedModel with a causal LM head
    eos_id: int
    source: str

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def context(self) -> int:
        return int(getattr(self.model.config, "n_positions", 1024))

    def encode(self, texts: list[str], max_tokens: int | None = None) -> list[np.ndarray]:
        """Token ids of each text (cut to ``max_tokens``)."""
        out = []
        for start in range(0, len(texts), 2000):  # chunks: an Encoding is far larger than its ids
            encodings = self.tokenizer.encode_batch([clean_review(t) for t in texts[start:start + 2000]])
            out += [np.asarray(e.ids[:max_tokens] if max_tokens else e.ids, dtype=np.int64) for e in encodings]
        return out

    def decode(self, ids: np.ndarray) -> str:
        return str(self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True))


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_prepared(folder: Path) -> LanguageModel:
    """The GPT-2 and tokenizer ``fedrlhf prepare imdb`` wrote to ``folder``."""
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    quiet_transformers()
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        model = GPT2LMHeadModel.from_pretrained(str(folder / "model"), local_files_only=True, use_safetensors=True)
    except Exception as err:  # noqa: BLE001 - tokenizers, safetensors and transformers each raise their own
        raise damaged(folder, err) from None
    model.eval()
    eos = tokenizer.token_to_id(END_OF_TEXT)
    if eos is None:
        raise UserError(f"{folder / 'tokenizer.json'}: no {END_OF_TEXT} token; delete {folder} and prepare again")
    return LanguageModel(tokenizer, model, int(eos), str(folder))


def damaged(folder: Path, err: BaseException) -> UserError:
    return UserError(
        f"{folder}: the prepared IMDb models are damaged ({type(err).__name__}); delete the folder and run "
        "fedrlhf prepare imdb again"
    )


def load_local_hf(name: str, field: str, auto_model: Any, what: str, otherwise: str) -> tuple[Any, Any]:
    """``(tokenizer, model)`` of Hugging Face model ``name`` (``auto_model``, e.g.
    ``AutoModelForCausalLM``) from a folder or the local cache only, safetensors weights only.
    Anything else — missing, damaged (safetensors, JSON), not ``what`` — is one line naming
    ``field`` and saying what to do ``otherwise``."""
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = auto_model.from_pretrained(name, local_files_only=True, use_safetensors=True)
    except Exception as err:  # noqa: BLE001 - missing, damaged (safetensors, JSON) or foreign: each raises its own
        raise UserError(
            f"{field}: {name!r} is not {what} in a local folder or the local Hugging Face cache with safetensors "
            f"weights ({type(err).__name__}); download it yourself (huggingface-cli download {name}) or {otherwise}"
        ) from None
    return tokenizer, model


def load_pretrained(name: str, field: str = "lm.pretrained") -> LanguageModel:
    """A Hugging Face causal LM and its tokenizer, from a folder or the local cache only."""
    from transformers import AutoModelForCausalLM

    hf_tokenizer, model = load_local_hf(
        name, field, AutoModelForCausalLM, "a causal language model",
        f"leave {field} unset for the platform's own small GPT-2",
    )
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{field}: {name!r} has no fast (Rust) tokenizer; use a model with a tokenizer.json")
    eos = hf_tokenizer.eos_token_id
    model.eval()
    return LanguageModel(backend, model, int(eos if eos is not None else 0), name)


@torch.no_grad()
def continuation_logprobs(model: Any, prompt: np.ndarray, continuations: list[np.ndarray]) -> list[np.ndarray]:
    """log p(token | prefix) of each continuation's tokens under ``model`` after ``prompt``."""
    if not continuations:
        return []
    lengths = [len(c) for c in continuations]
    width = len(prompt) + max(lengths)
    ids = np.zeros((len(continuations), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, c in enumerate(continuations):
        seq = np.concatenate([prompt, c])
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    logits = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, c in enumerate(continuations):
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c))
        out.append(logp[i, positions, torch.as_tensor(c)].numpy().astype(np.float64))
    return out


def fluency(logprobs: np.ndarray, vocab_size: int) -> float:
    """1 − NLL/ln V: 1 for a continuation the reference finds certain, 0 for one as likely as uniform
    noise (negative when less likely than that). An empty continuation has fluency 0."""
    if len(logprobs) == 0:
        return 0.0
    return 1.0 - float(-np.mean(logprobs)) / math.log(vocab_size)
