"""Judges of the generated text that share nothing with the clients' reward: VADER's lexicon
sentiment (rules and a hand-made lexicon of social-media English, knowing nothing of IMDb or of
any client's reviews), and the rate of continuations that repeat themselves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class LexiconJudge:
    """VADER's compound score of the decoded continuation, mapped from [−1, 1] to [0, 1] (0.5:
    neutral; "It is a film." scores 0.5, where the clients' bag-of-tokens family scored 1.0)."""

    def __init__(self, decode: Callable[[np.ndarray], str]) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.decode = decode
        self.analyzer = SentimentIntensityAnalyzer()

    def positive_probability(self, continuations: Sequence[np.ndarray]) -> np.ndarray:
        compound = [self.analyzer.polarity_scores(self.decode(c))["compound"] for c in continuations]
        return (np.asarray(compound, dtype=np.float64) + 1.0) / 2.0


def repeated_ngram_rate(continuations: Sequence[np.ndarray], n: int = 2) -> float:
    """The share of continuations in which some n-gram of tokens occurs twice (degenerate,
    looping text; 0 when there are none)."""
    if not continuations:
        return 0.0
    repeats = 0
    for c in continuations:
        grams = [tuple(c[i:i + n].tolist()) for i in range(len(c) - n + 1)]
        repeats += len(set(grams)) < len(grams)
    return repeats / len(continuations)


class WordNgramJudge:
    """The independent sentiment judge: TF-IDF of word unigrams and bigrams (hashed, so nothing
    is learnt about the vocabulary but the IDF) and a logistic regression, scikit-learn's, trained
    on IMDb test reviews that no client ever holds (:func:`envs.data.imdb.is_judge_review`). A
    different family from the clients' reward models (bag of the LM's own BPE tokens, trained on
    their train shards): it reads the decoded words, and shares neither data nor tokenizer."""

    FEATURES = 2**18
    VERSION = "word-1-2gram-tfidf-logreg-v1"  # part of the prepared folder's hash

    def __init__(self, idf: np.ndarray, coef: np.ndarray, intercept: float) -> None:
        from sklearn.feature_extraction.text import TfidfTransformer
        from sklearn.linear_model import LogisticRegression

        self.vectorizer = self._vectorizer()
        self.tfidf = TfidfTransformer(sublinear_tf=True)
        self.tfidf.idf_ = idf
        self.model = LogisticRegression()
        self.model.coef_ = coef.reshape(1, -1).astype(np.float64)
        self.model.intercept_ = np.array([intercept], dtype=np.float64)
        self.model.classes_ = np.array([0, 1])

    @classmethod
    def _vectorizer(cls) -> Any:
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(n_features=cls.FEATURES, ngram_range=(1, 2), alternate_sign=False, norm=None)

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[int]) -> WordNgramJudge:
        from sklearn.feature_extraction.text import TfidfTransformer
        from sklearn.linear_model import LogisticRegression

        counts = cls._vectorizer().transform(texts)
        tfidf = TfidfTransformer(sublinear_tf=True).fit(counts)
        model = LogisticRegression(C=4.0, max_iter=2000).fit(tfidf.transform(counts), np.asarray(labels))
        return cls(tfidf.idf_.astype(np.float32), model.coef_.ravel().astype(np.float32), float(model.intercept_[0]))

    def positive_probability_of_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        features = self.tfidf.transform(self.vectorizer.transform(texts))
        return self.model.predict_proba(features)[:, 1]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"idf": np.asarray(self.tfidf.idf_, dtype=np.float32),
                "coef": self.model.coef_.ravel().astype(np.float32),
                "intercept": self.model.intercept_.astype(np.float32)}


class DecodedJudge:
    """A judge of words applied to token continuations through the LM's tokenizer."""

    def __init__(self, judge: WordNgramJudge, decode: Callable[[np.ndarray], str]) -> None:
        self.judge, self.decode = judge, decode

    def positive_probability(self, continuations: Sequence[np.ndarray]) -> np.ndarray:
        return self.judge.positive_probability_of_texts([self.decode(c) for c in continuations])
