"""Lexical retrieval: BM25 with Lucene's formula over a language's analysed terms.

Both sides use this module, so a collection's lexical index and ``embedlift eval`` rank identically:

- ``Analyzer``: lower-case, word tokens of two or more characters (``\\w\\w+``, as scikit-learn and bm25s
  cut them), the language's stop words dropped (Lucene's lists, as bm25s ships them), Snowball-stemmed
  (PyStemmer). The analyzer's ``version`` names all of it, so an index built with another one is rebuilt.
- The score of a unit ``d`` (a document window: a document scores by its best window, as on the dense side,
  which measured better on the Lyft 10-K data than whole documents) for query terms ``q``::

      sum over t in q of  idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * len(d) / avglen))
      idf(t) = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))

  with ``k1 = 1.2``, ``b = 0.75`` (Lucene's BM25Similarity, bm25s' ``method="lucene"``); ``N`` is the number of
  units, ``n(t)`` how many contain ``t``, a term repeated in the query counts each time.
- ``BM25Matrix``: exact scores of queries against a fixed set of units (evaluation, alpha fitting), a
  sparse matrix product.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from itertools import accumulate
from typing import Any

import numpy as np

from embedlift.client.schemas import LANGUAGES, Language, LexicalSettings  # wire types: a collection's settings
from embedlift.models.errors import InvalidInputError

K1 = 1.2
B = 0.75
# bm25s' stop-word lists (Lucene's for English) by language
_STOPWORDS = {
    "english": "STOPWORDS_EN", "german": "STOPWORDS_GERMAN", "dutch": "STOPWORDS_DUTCH", "french": "STOPWORDS_FRENCH",
    "spanish": "STOPWORDS_SPANISH", "portuguese": "STOPWORDS_PORTUGUESE", "italian": "STOPWORDS_ITALIAN",
    "russian": "STOPWORDS_RUSSIAN", "swedish": "STOPWORDS_SWEDISH", "norwegian": "STOPWORDS_NORWEGIAN",
    "danish": "STOPWORDS_DANISH", "turkish": "STOPWORDS_TURKISH",
}
_TOKEN = re.compile(r"(?u)\b\w\w+\b")
_SPLIT = re.compile(r"(?u)\b(\w\w+)\b")  # the same tokens, with what lies between them
#: Distinct words an analyzer remembers the terms of (a few tens of MB at most).
MAX_KNOWN_WORDS = 500_000
#: A term is at most this many characters, its word's first ones (Lucene's maxTokenLength). A longer "word" is a
#: base64 blob, a hash or a run-on URL; whole, it would not fit PostgreSQL's index of the postings (a btree row
#: holds 2,704 bytes: the upsert failed).
MAX_TERM_CHARS = 255


@dataclass(frozen=True)
class AnalysedText:
    """A text's tokens once, so that each of its (overlapping) windows counts its own terms without analysing
    the overlap again: every token's ``[start, end)`` in the text and its term (``""`` for a stop word)."""

    lowered: str
    starts: list[int]
    ends: list[int]
    terms: list[str]


class Analyzer:
    """Text to index terms for one language. Thread-safe (each thread gets its own stemmer)."""

    def __init__(self, language: str = "english") -> None:
        if language not in LANGUAGES:
            raise InvalidInputError(f"lexical language must be one of {list(LANGUAGES)}, got {language!r}")
        import bm25s.stopwords
        import Stemmer

        self.language = language
        self.stopwords = frozenset(getattr(bm25s.stopwords, _STOPWORDS[language]))
        self._stemmer = Stemmer.Stemmer(language)
        self.version = f"{language}:pystemmer-{Stemmer.version()}:stop-{len(self.stopwords)}:max-{MAX_TERM_CHARS}"
        import threading

        self._local = threading.local()
        self._known: dict[str, str] = {}  # word -> its term ("" for a stop word)

    def _stem(self, words: list[str]) -> list[str]:
        stemmer = getattr(self._local, "stemmer", None)
        if stemmer is None:
            import Stemmer

            stemmer = self._local.stemmer = Stemmer.Stemmer(self.language)
        stemmed: list[str] = stemmer.stemWords(words)
        return stemmed

    def _terms_of(self, words: set[str]) -> dict[str, str]:
        """Each word's term ("" for a stop word), remembered while fewer than ``MAX_KNOWN_WORDS`` are known."""
        plain = [w for w in words if w not in self.stopwords]
        found = dict.fromkeys(words - set(plain), "") | {w: t[:MAX_TERM_CHARS] for w, t in zip(plain, self._stem(plain), strict=True)}
        if len(self._known) < MAX_KNOWN_WORDS:
            self._known.update(found)
        return found

    def terms(self, text: str) -> list[str]:
        """The text's index terms, in order (repeats kept). Each distinct word is stemmed once, then looked up
        (indexing a collection sees the same words again and again)."""
        words = _TOKEN.findall(text.lower())
        known = self._known
        found = [known.get(w) for w in words]
        if None in found:
            new = self._terms_of({w for w, t in zip(words, found, strict=True) if t is None})
            found = [t if t is not None else new[w] for w, t in zip(words, found, strict=True)]
        return [t for t in found if t]

    def counts(self, text: str) -> tuple[int, dict[str, int]]:
        """``(length in terms, {term: frequency})``: what an index stores of one unit."""
        terms = self.terms(text)
        return len(terms), dict(Counter(terms))

    def analyse(self, text: str) -> AnalysedText | None:
        """The text's tokens with their places and terms, for ``window_counts``. ``None`` where lower-casing is
        not character by character (the text's length changes, or a capital sigma, whose lower case depends on
        what follows it): there each window is analysed on its own."""
        lowered = text.lower()
        if len(lowered) != len(text) or "\u03a3" in text:
            return None
        parts = _SPLIT.split(lowered)  # between, token, between, token, ..., between
        words = parts[1::2]
        bounds = list(accumulate(map(len, parts)))  # where each part ends
        known = self._known
        terms = list(map(known.get, words))
        if None in terms:
            new = self._terms_of({w for w, t in zip(words, terms, strict=True) if t is None})
            terms = [t if t is not None else new[w] for w, t in zip(words, terms, strict=True)]
        return AnalysedText(lowered=lowered, starts=bounds[0::2][: len(words)], ends=bounds[1::2], terms=terms)  # type: ignore[arg-type]

    def window_counts(self, text: str, spans: Sequence[tuple[int, int]], analysed: AnalysedText | None = None) -> list[tuple[int, dict[str, int]]]:
        """``counts`` of each window ``text[a:b]``, from one analysis of the whole text (``analysed``, else made
        here): the tokens inside a window are counted as they are; a token cut by the window's edge is analysed
        as the part the window holds, as ``counts`` of the slice would."""
        if analysed is None:
            analysed = self.analyse(text)
        if analysed is None:
            return [self.counts(text[a:b]) for a, b in spans]
        low, starts, ends, terms = analysed.lowered, analysed.starts, analysed.ends, analysed.terms
        out = []
        for a, b in spans:
            first, last = bisect.bisect_left(starts, a), bisect.bisect_right(ends, b)  # the tokens inside: [first, last)
            counts = Counter(terms[first:last])
            if first > 0 and ends[first - 1] > a:  # a token cut by the window's start (or holding the whole window)
                counts.update(self.terms(low[a : min(ends[first - 1], b)]))
            if first <= last < len(starts) and starts[last] < b:  # a token cut by its end
                counts.update(self.terms(low[starts[last] : b]))
            counts.pop("", None)
            out.append((sum(counts.values()), dict(counts)))
        return out


@cache
def analyzer(language: str = "english") -> Analyzer:
    """The (shared) analyzer of a language."""
    return Analyzer(language)


def idf(n_units: int, df: np.ndarray | float) -> np.ndarray:
    """Lucene's idf of terms that occur in ``df`` of ``n_units`` units."""
    return np.log1p((n_units - df + 0.5) / (df + 0.5))


def tf_component(tf: np.ndarray, length: np.ndarray, avg_length: float) -> np.ndarray:
    """``tf / (tf + k1 * (1 - b + b * len / avglen))``: how much a term's frequency in a unit counts."""
    return tf / (tf + K1 * (1 - B + B * length / max(avg_length, 1e-9)))


class BM25Matrix:
    """Exact BM25 of queries against a fixed list of units (texts), as one sparse matrix of term weights.

    Args:
        texts: The units' texts (a dataset's document windows).
        language: The analyzer's language.
    """

    def __init__(self, texts: Sequence[str], language: str = "english") -> None:
        from scipy import sparse

        self.analyzer = analyzer(language)
        vocabulary: dict[str, int] = {}
        rows, cols, tfs, lengths = [], [], [], []
        for i, text in enumerate(texts):
            length, counts = self.analyzer.counts(text)
            lengths.append(length)
            for term, tf in counts.items():
                rows.append(i)
                cols.append(vocabulary.setdefault(term, len(vocabulary)))
                tfs.append(tf)
        self.vocabulary = vocabulary
        self.n_units = len(texts)
        length_array = np.asarray(lengths, dtype=np.float64)
        avg = float(length_array.mean()) if len(texts) else 0.0
        row_array, col_array = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        tf_array = np.asarray(tfs, dtype=np.float64)
        df = np.bincount(col_array, minlength=len(vocabulary)).astype(np.float64)
        weights = idf(self.n_units, df)[col_array] * tf_component(tf_array, length_array[row_array], avg)
        # (vocabulary, units): a query's term counts times this is its score against every unit
        self.weights = sparse.csr_matrix((weights, (col_array, row_array)), shape=(len(vocabulary), self.n_units))

    def query_counts(self, queries: Sequence[str]) -> Any:
        """``(n_queries, vocabulary)`` sparse counts of each query's terms that the units contain."""
        from scipy import sparse

        rows, cols = [], []
        for qi, query in enumerate(queries):
            for term in self.analyzer.terms(query):
                if (col := self.vocabulary.get(term)) is not None:
                    rows.append(qi)
                    cols.append(col)
        data = np.ones(len(rows), dtype=np.float64)
        return sparse.csr_matrix((data, (rows, cols)), shape=(len(queries), len(self.vocabulary)))

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """``(n_queries, n_units)`` float64 BM25 scores (0 where no query term occurs)."""
        product = self.query_counts(queries) @ self.weights
        return np.asarray(product.toarray(), dtype=np.float64)
