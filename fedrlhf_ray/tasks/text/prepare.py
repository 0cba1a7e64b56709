"""``fedrlhf prepare imdb``: the public models of the IMDb task, built once and cached.

1. a byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on the pre-training corpus;
2. a small GPT-2 (``transformers``' ``GPT2LMHeadModel``) pre-trained on it, on CPU: random windows
   of the concatenated reviews, AdamW with warm-up and cosine decay;
3. the independent sentiment judge (:class:`~fedrlhf_ray.tasks.text.judges.WordNgramJudge`):
   word n-gram TF-IDF and a logistic regression, trained on 80 % of the test reviews no client
   ever holds (:func:`envs.data.imdb.is_judge_review`), scored on the other 20 %;
4. the judge LM: a GPT-2 of the public model's shape and tokenizer pre-trained on the judge's
   reviews, under which the evaluation measures the continuations' perplexity, apart from the
   reference that scores the clients' fluency reward.

The folder is named by a hash of every setting that changes the result (and of the data's counts),
so a changed setting prepares anew and an unchanged one is reused; it appears atomically (built in a
temporary folder, then renamed). With ``lm.pretrained`` (a Hugging Face model) only the judge is
built, and no judge LM. Everything is a function of ``lm.pretrain_seed``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrlhf_ray.errors import UserError
from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.tasks.text.judges import WordNgramJudge
from fedrlhf_ray.tasks.text.lm import END_OF_TEXT, LanguageModel, clean_review, damaged, load_prepared, load_pretrained

REPORT = "report.json"
JUDGE = "judge.safetensors"
# A GPT-2 of the public model's shape and tokenizer, pre-trained on the judge's reviews (which
# neither the public model nor any client saw): fluency judged apart from the reward's reference.
JUDGE_LM = "judge_lm"
JUDGE_TEST_SHARE = 0.2  # of the judge's reviews, held out to score it
# Held-out perplexity is measured on this many test reviews (never in any pre-training corpus).
PERPLEXITY_REVIEWS = 500


def _settings(cfg: ExperimentConfig) -> dict[str, Any]:
    lm = cfg.language_model()
    model = (
        {"pretrained": lm.pretrained}
        if lm.pretrained is not None
        else {k: getattr(lm, k) for k in (
            "vocab_size", "n_layer", "n_embd", "n_head", "context", "corpus", "max_texts",
            "pretrain_steps", "pretrain_batch_size", "pretrain_lr",
        )}
    )
    return {"version": 4, "seed": lm.pretrain_seed, "model": model, "judge": WordNgramJudge.VERSION}


def cache_root(cfg: ExperimentConfig) -> Path:
    from envs.data.movielens.parsed_cache import default_cache_dir

    base = cfg.imdb().cache_dir
    return (Path(base).expanduser() if base else default_cache_dir()) / "imdb-lm"


def prepared_folder(cfg: ExperimentConfig) -> Path:
    """Where the prepared models of ``cfg``'s settings live (whether or not they exist yet)."""
    digest = hashlib.sha256(json.dumps(_settings(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(cfg) / digest


def load_lm(cfg: ExperimentConfig) -> LanguageModel:
    """The experiment's LM: ``lm.pretrained``, or the prepared one (which must exist)."""
    pretrained = cfg.language_model().pretrained
    if pretrained is not None:
        return load_pretrained(pretrained)
    folder = prepared_folder(cfg)
    if not (folder / REPORT).exists():
        raise UserError(
            f"the IMDb language model is not prepared ({folder}); run: fedrlhf prepare imdb <experiment file>"
        )
    return load_prepared(folder)


def is_prepared(cfg: ExperimentConfig) -> bool:
    return (prepared_folder(cfg) / REPORT).exists()


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"), disable=not enabled, transient=False,
    )


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _token_stream(tokenizer: Any, texts: list[str], eos: int, chunk: int = 2000) -> np.ndarray:
    """All texts' tokens, each followed by end-of-text, as one array (encoded in chunks: a
    tokenizers Encoding keeps offsets and strings too, gigabytes for the whole corpus)."""
    parts = []
    for start in range(0, len(texts), chunk):
        for enc in tokenizer.encode_batch(texts[start:start + chunk]):
            parts.append(np.asarray(enc.ids + [eos], dtype=np.int32))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _windows(stream: np.ndarray, starts: np.ndarray, width: int) -> torch.Tensor:
    return torch.as_tensor(np.stack([stream[s:s + width] for s in starts]))


@torch.no_grad()
def perplexity(model: Any, stream: np.ndarray, width: int, max_windows: int = 256) -> float:
    """exp(mean next-token NLL) over consecutive windows of a held-out token stream."""
    model.eval()
    count = min(max_windows, (len(stream) - 1) // width)
    if count == 0:
        return float("nan")
    losses = []
    for start in range(0, count, 32):
        starts = np.arange(start, min(count, start + 32)) * width
        batch = _windows(stream, starts, width)
        losses.append(float(model(input_ids=batch, labels=batch).loss) * len(starts))
    return math.exp(sum(losses) / count)


def pretrain(
    cfg: ExperimentConfig, tokenizer: Any, corpus: list[str], heldout: list[str], progress: bool,
    label: str = "pre-training GPT-2",
) -> tuple[Any, dict]:
    # GPT-2's initialisation and its dropout draw from torch's global generator: seed it in this scope only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.language_model().pretrain_seed)
        return _pretrain(cfg, tokenizer, corpus, heldout, progress, label)


def _pretrain(
    cfg: ExperimentConfig, tokenizer: Any, corpus: list[str], heldout: list[str], progress: bool, label: str
) -> tuple[Any, dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedrlhf_ray.tasks.text.lm import quiet_transformers

    quiet_transformers()
    lm = cfg.language_model()
    eos = int(tokenizer.token_to_id(END_OF_TEXT))
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=tokenizer.get_vocab_size(), n_positions=lm.context, n_embd=lm.n_embd, n_layer=lm.n_layer,
        n_head=lm.n_head, bos_token_id=eos, eos_token_id=eos,
    ))
    stream = _token_stream(tokenizer, corpus, eos)
    if len(stream) <= lm.context:
        raise UserError(
            f"lm.max_texts: got {lm.max_texts} — those reviews make {len(stream)} tokens, not one lm.context window "
            f"of {lm.context} to pre-train on; raise lm.max_texts (0: all) or lower lm.context"
        )
    held = _token_stream(tokenizer, heldout, eos)
    rng = np.random.default_rng([lm.pretrain_seed, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lm.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, lm.pretrain_steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, lm.pretrain_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ppl_before = perplexity(model, held, lm.context)
    model.train()
    with _progress(progress) as bar:
        task = bar.add_task(label, total=lm.pretrain_steps, info="")
        for step in range(lm.pretrain_steps):
            starts = rng.integers(0, len(stream) - lm.context, size=lm.pretrain_batch_size)
            batch = _windows(stream, starts, lm.context)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if step % 50 == 0 or step == lm.pretrain_steps - 1:
                bar.update(task, completed=step + 1, info=f"loss {loss.item():.3f}")
    model.eval()
    stats = {
        "corpus_tokens": len(stream),
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_perplexity_initial": ppl_before,
        "heldout_perplexity": perplexity(model, held, lm.context),
        "tokens_seen": lm.pretrain_steps * lm.pretrain_batch_size * lm.context,
    }
    return model, stats


def judge_split(cfg: ExperimentConfig, test: list[Any]) -> tuple[list[Any], list[Any]]:
    """The test reviews no client holds, 80 % to train the judges and 20 % to score them."""
    from envs.data.imdb import is_judge_review

    reviews = [r for r in test if is_judge_review(r)]
    if len({r.label for r in reviews}) < 2:
        raise UserError("env.imdb.path: the IMDb test split holds no positive and negative reviews with odd ids, "
                        "which train the independent judge; point it at the whole aclImdb data")
    order = np.random.default_rng([cfg.language_model().pretrain_seed, 1]).permutation(len(reviews))
    cut = len(reviews) - round(JUDGE_TEST_SHARE * len(reviews))
    return [reviews[i] for i in order[:cut]], [reviews[i] for i in order[cut:]]


def train_judge(train: list[Any], held: list[Any]) -> tuple[WordNgramJudge, dict]:
    """The independent sentiment judge, scored on ``held``."""
    judge = WordNgramJudge.fit([clean_review(r.text) for r in train], [r.label for r in train])
    scores = judge.positive_probability_of_texts([clean_review(r.text) for r in held])
    accuracy = float(((scores > 0.5) == np.array([r.label for r in held])).mean()) if held else float("nan")
    return judge, {"test_accuracy": accuracy, "train_reviews": len(train), "test_reviews": len(held)}


def save_judge(judge: WordNgramJudge, path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(judge.arrays(), str(path), metadata={"judge": WordNgramJudge.VERSION})


def load_judge_lm(folder: Path) -> Any:
    """The judge LM of a prepared folder, or None where there is none (``lm.pretrained``)."""
    from transformers import GPT2LMHeadModel

    from fedrlhf_ray.tasks.text.lm import quiet_transformers

    if not (folder / JUDGE_LM).is_dir():
        return None
    quiet_transformers()
    try:
        model = GPT2LMHeadModel.from_pretrained(str(folder / JUDGE_LM), local_files_only=True, use_safetensors=True)
    except Exception as err:  # noqa: BLE001 - safetensors and transformers each raise their own
        raise damaged(folder, err) from None
    return model.eval()


def load_judge(path: Path) -> WordNgramJudge:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            if f.metadata().get("judge") != WordNgramJudge.VERSION:
                raise ValueError(f"judge {f.metadata().get('judge')!r}, not {WordNgramJudge.VERSION}")
            idf, coef, intercept = (f.get_tensor(k) for k in ("idf", "coef", "intercept"))
        if idf.shape != (WordNgramJudge.FEATURES,) or coef.shape != idf.shape or intercept.shape != (1,):
            raise ValueError("arrays of the wrong shape")
        return WordNgramJudge(idf.astype(np.float64), coef, float(intercept[0]))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise damaged(path.parent, err) from None


def prepare(
    cfg: ExperimentConfig, *, progress: bool = False, data: Any = None, announce: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Build (or find) the prepared models for ``cfg``; returns their folder and report.

    ``announce``: say on stderr that a preparation starts (a run that prepares first)."""
    folder = prepared_folder(cfg)
    classifier = cfg.language_model().sentiment.pretrained
    if classifier is not None:  # every client actor would load it: one line here instead
        from fedrlhf_ray.tasks.text.sentiment import load_classifier

        load_classifier(classifier)
    if (folder / REPORT).exists():
        cached = read_report(folder)
        # A damaged file is one line here, before a run starts actors that would each fail on it.
        if cfg.language_model().pretrained is None:
            load_prepared(folder)
        load_judge(folder / JUDGE)
        load_judge_lm(folder)
        return folder, cached
    pretrained = cfg.language_model().pretrained
    if pretrained is not None:
        load_pretrained(pretrained)  # a missing model is one line before any work
    if announce:
        print(f"preparing the IMDb models once (cached in {folder}); `fedrlhf prepare imdb` does it ahead",
              file=sys.stderr, flush=True)
    from envs.data.imdb import load_imdb

    imdb = cfg.imdb()
    if data is None:
        data = load_imdb(imdb.path, cache_dir=imdb.cache_dir, download=imdb.download)
    lm_cfg = cfg.language_model()
    start = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".prepare-", dir=folder.parent))
    try:
        report: dict[str, Any] = {"settings": _settings(cfg), "data": data.counts()}
        if lm_cfg.pretrained is None:
            splits = ("train", "unsup") if lm_cfg.corpus == "train+unsup" else ("unsup",)
            texts = [clean_review(r.text) for s in splits for r in data.reviews[s]]
            if lm_cfg.max_texts:
                pick = np.random.default_rng([lm_cfg.pretrain_seed, 0]).permutation(len(texts))[: lm_cfg.max_texts]
                texts = [texts[i] for i in sorted(pick)]
            heldout = [clean_review(r.text) for r in data.reviews["test"][::max(1, 25000 // PERPLEXITY_REVIEWS)]]
            t0 = time.perf_counter()
            tokenizer = train_tokenizer(texts, lm_cfg.vocab_size)
            report["tokenizer_seconds"] = time.perf_counter() - t0
            tokenizer.save(str(work / "tokenizer.json"))
            t0 = time.perf_counter()
            model, stats = pretrain(cfg, tokenizer, texts, heldout, progress)
            report["pretrain_seconds"] = time.perf_counter() - t0
            report["pretrain"] = {**stats, "texts": len(texts)}
            model.save_pretrained(str(work / "model"), safe_serialization=True)
            load_prepared(work)  # what was written loads
        judge_train, judge_held = judge_split(cfg, data.reviews["test"])
        if lm_cfg.pretrained is None:
            t0 = time.perf_counter()
            judge_lm, judge_lm_stats = pretrain(
                cfg, tokenizer, [clean_review(r.text) for r in judge_train],
                [clean_review(r.text) for r in judge_held], progress, label="pre-training the judge LM",
            )
            report["judge_lm"] = {**judge_lm_stats, "texts": len(judge_train), "seconds": time.perf_counter() - t0}
            judge_lm.save_pretrained(str(work / JUDGE_LM), safe_serialization=True)
        t0 = time.perf_counter()
        judge, judge_stats = train_judge(judge_train, judge_held)
        report["judge"] = {**judge_stats, "seconds": time.perf_counter() - t0}
        save_judge(judge, work / JUDGE)
        report["seconds"] = time.perf_counter() - start
        (work / REPORT).write_text(json.dumps(report, indent=2))
        try:
            os.rename(work, folder)
        except OSError:
            if not (folder / REPORT).exists():  # not a concurrent prepare that finished first
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return folder, read_report(folder)


def read_report(folder: Path) -> dict[str, Any]:
    try:
        report = json.loads((folder / REPORT).read_text())
    except (OSError, ValueError) as err:
        raise UserError(
            f"{folder / REPORT}: the prepared IMDb models are damaged ({type(err).__name__}); delete {folder} "
            "and run fedrlhf prepare imdb again"
        ) from None
    if not isinstance(report, dict):
        raise UserError(f"{folder / REPORT}: not a prepare report; delete {folder} and run fedrlhf prepare imdb again")
    return report
