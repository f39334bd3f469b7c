"""Concept vocabularies: the words a detector labels neurons with, each with a category.

Three sources, all offline:

* :func:`probe_vocabulary` -- the concepts annotated in a probe set (ConceptShapes:
  26 concepts in 5 categories, with pixel masks; the default of :class:`NetDissect`).
* :func:`english_vocabulary` -- ~1,000 common concrete English words shipped with the
  package (``data/english_concepts.tsv``), grouped into the Broden categories (colour,
  texture, material, part, object, scene) plus shape; the default of
  :class:`CLIPDissect`.  Compiled by hand for this project.
* :func:`load_words` -- a user file, one word a line (optionally ``word<TAB>category``).

A word given without a category keeps its category in the shipped list when it is
there ("red" is a colour in any list), else gets ``"other"``.

All of them go through :func:`make_vocabulary`, which rejects empty lists and drops
duplicates with a warning (first occurrence wins, order kept).

Example:
    >>> vocab = make_vocabulary(["red", "circle", "red"], ["colour", "shape", "colour"])
    ... # doctest: +SKIP  (warns: 1 duplicate concept dropped: 'red')
    >>> vocab.names
    ('red', 'circle')
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from ..probes.base import ConceptVocabulary

#: category given to words whose category is unknown
UNKNOWN_CATEGORY = "other"

DATA_DIR = Path(__file__).resolve().parent / "data"
ENGLISH_FILE = DATA_DIR / "english_concepts.tsv"


def make_vocabulary(
    concepts: Union[ConceptVocabulary, Iterable[str]],
    categories: Optional[Sequence[str]] = None,
    what: str = "concept list",
) -> ConceptVocabulary:
    """Validated :class:`ConceptVocabulary` from words (and optional categories).

    Words are stripped; empty words are an error; duplicates (after stripping, case
    kept) are dropped with a warning, keeping the first occurrence and its category.

    Raises:
        ValueError: empty list, empty word, or categories of another length.
        TypeError: a word that is not a string.
    """
    if isinstance(concepts, ConceptVocabulary):
        names, cats = list(concepts.names), list(concepts.categories)
    else:
        if isinstance(concepts, str):
            raise TypeError(f"{what}: give a list of words, not one string ({concepts!r})")
        names = list(concepts)
        cats = list(categories) if categories is not None else [None] * len(names)
        if len(cats) != len(names):
            raise ValueError(f"{what}: {len(names)} concepts but {len(cats)} categories")
    if not names:
        raise ValueError(f"{what} is empty: give at least one concept word")
    clean_names, clean_cats, duplicates, seen = [], [], [], set()
    for position, (word, category) in enumerate(zip(names, cats)):
        if not isinstance(word, str):
            raise TypeError(f"{what}: concept #{position} is {type(word).__name__}, not a string")
        word = word.strip()
        if not word:
            raise ValueError(f"{what}: concept #{position} is an empty string")
        if word in seen:
            duplicates.append(word)
            continue
        seen.add(word)
        clean_names.append(word)
        category = str(category).strip() if category is not None else ""
        clean_cats.append(category or known_category(word))
    if duplicates:
        shown = ", ".join(repr(w) for w in duplicates[:10]) + (" ..." if len(duplicates) > 10 else "")
        warnings.warn(f"{what}: {len(duplicates)} duplicate concept(s) dropped: {shown}", UserWarning, stacklevel=3)
    return ConceptVocabulary(tuple(clean_names), tuple(clean_cats))


def probe_vocabulary(probe, argument: str = "concepts=[...]") -> ConceptVocabulary:
    """The probe set's own concepts (e.g. ConceptShapes), validated.

    ``argument``: how the detector is given words instead (named in the error)."""
    vocabulary = getattr(probe, "vocabulary", None)
    if vocabulary is None:
        raise ValueError(
            f"probe set {type(probe).__name__} has no concept vocabulary; pass {argument} "
            "(a list of words, load_words(path) or english_vocabulary())"
        )
    return make_vocabulary(vocabulary, what=f"{type(probe).__name__}.vocabulary")


def load_words(path: Union[str, os.PathLike], default_category: str = UNKNOWN_CATEGORY) -> ConceptVocabulary:
    """Read concept words from a text file, one a line.

    A line may be ``word`` or ``word<TAB>category``; blank lines and lines starting
    with ``#`` are skipped.  Multi-word concepts ("traffic light") are kept whole.

    Example:
        >>> load_words("my_concepts.txt")          # doctest: +SKIP
        ConceptVocabulary(names=('zebra', 'stripes'), categories=('other', 'other'))
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"concept file {str(path)!r} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"concept file {str(path)!r} is not UTF-8 text ({exc})") from None
    names, cats = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, category = line.partition("\t")
        names.append(word.strip())
        cats.append(category.strip() or known_category(word.strip(), default_category))
    if not names:
        raise ValueError(f"concept file {str(path)!r} has no words (one word a line expected)")
    return make_vocabulary(names, cats, what=f"concept file {path.name!r}")


@functools.lru_cache(maxsize=1)
def _shipped_categories() -> dict:
    """``{word: category}`` of the shipped list (read once; first category wins)."""
    known = {}
    for line in ENGLISH_FILE.read_text(encoding="utf-8").splitlines():
        word, _, category = line.strip().partition("\t")
        if word and not word.startswith("#") and category.strip():
            known.setdefault(word.strip(), category.strip())
            known.setdefault(word.strip().lower(), category.strip())
    return known


def known_category(word: str, default: str = UNKNOWN_CATEGORY) -> str:
    """The category of ``word`` in the shipped list (exact, then lower case), else ``default``."""
    known = _shipped_categories()
    return known.get(word) or known.get(word.lower()) or default


def english_vocabulary(categories: Optional[Sequence[str]] = None, limit: Optional[int] = None) -> ConceptVocabulary:
    """The shipped list of ~1,000 common concrete English words with categories.

    Args:
        categories: keep only these categories (e.g. ``["colour", "texture"]``).
        limit: keep only the first ``limit`` words (after the category filter).
    """
    vocabulary = load_words(ENGLISH_FILE)
    names, cats = vocabulary.names, vocabulary.categories
    if categories is not None:
        wanted = set(categories)
        unknown = wanted - set(cats)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; available: {sorted(set(cats))}")
        keep = [i for i, c in enumerate(cats) if c in wanted]
        names, cats = tuple(names[i] for i in keep), tuple(cats[i] for i in keep)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        names, cats = names[:limit], cats[:limit]
    return ConceptVocabulary(tuple(names), tuple(cats))


def resolve_vocabulary(concepts, categories=None, probe=None, fallback=None) -> ConceptVocabulary:
    """Turn a detector's ``concepts=`` argument into a vocabulary.

    ``concepts`` may be a :class:`ConceptVocabulary`, a list of words, a path to a
    word file, the string ``"english"`` (:func:`english_vocabulary`) or ``"probe"``
    / None (the probe set's own vocabulary, else ``fallback()``).
    """
    if concepts is None or (isinstance(concepts, str) and concepts == "probe"):
        if probe is not None and getattr(probe, "vocabulary", None) is not None:
            return probe_vocabulary(probe)
        if fallback is not None:
            return fallback()
        if probe is None:
            raise ValueError("no concepts given and no probe set to take them from")
        return probe_vocabulary(probe)
    if isinstance(concepts, str) and concepts == "english":
        return english_vocabulary()
    if isinstance(concepts, (str, os.PathLike)):
        return load_words(concepts)
    return make_vocabulary(concepts, categories)
