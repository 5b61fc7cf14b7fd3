"""Labels grounded in WordNet: a label that names a synset above the image tower's classes scores by their mass.

The default image tower's classes are WordNet synsets. Its bundle carries a table
(``scoring.hierarchy``, written from WordNet 3.0 by ``scripts/make_wordnet_table.py``)
of which classes each noun covers: "an animal" covers 398 of ImageNet's classes,
"a vehicle" 67, "person" the groom, the scuba diver and the ballplayer. A label that
resolves scores by the probability mass of the classes beneath it, blended with the
class-space text scoring (``scoring.grounding_weight`` of the first); a label that does
not resolve (free text, a word WordNet lacks) keeps the text scoring alone.

Resolution: lower case; leading articles and "a photo of" dropped; the phrase as a
WordNet lemma (spaces as underscores), its singular (WordNet's irregular plurals, then
morphy's suffix rules), then, for two-word labels, the last word ("a red car" → car). The first
sense (WordNet orders senses by frequency) that covers at least ``min_classes`` classes wins.

Within one label set each class counts for the most specific label that covers it:
with "animal" and "dog", a terrier is a dog, a tabby an animal; "object" keeps what
nothing else claims.

The table is read from the bundle, so it is untrusted: its size, types and class
indices are checked, and anything else is a ``BundleError``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgemm.runtime.errors import BundleError

_LEADING = re.compile(r"^(?:(?:a|an|the|some|photo|picture|image|of)\s+)+")
_PIECE = re.compile(r"^(?:piece|kind|type|sort|article|item|pair)s?\s+of\s+")
_MAX_SENSES = 64


class LabelGrounding:
    """Which of the image tower's classes each label covers, from a bundle's hierarchy table.

    Args:
        table: The parsed JSON table.
        classes: How many classes the image graph scores (the table must agree).
        where: The table's name in error messages.
        min_classes: A label whose synset covers fewer classes does not resolve (keeps the text
            scoring): a single class's mass is noisier than the text's spread over similar names.

    Raises:
        BundleError: The table is malformed or names classes the graph does not have.
    """

    def __init__(self, table: Any, classes: int, where: str = "scoring.hierarchy", min_classes: int = 1):
        def bad(problem: str) -> BundleError:
            return BundleError(f"{where}: {problem}. Re-export the bundle.")

        if not isinstance(table, dict) or table.get("format") != 1:
            raise bad("is not an edgemm WordNet table (format 1)")
        if table.get("classes") != classes:
            raise bad(f"covers {table.get('classes')!r} classes, but the image graph has {classes}")
        synsets, lemmas, plurals = table.get("synsets"), table.get("lemmas"), table.get("plurals", {})
        if not isinstance(synsets, list) or not isinstance(lemmas, dict) or not isinstance(plurals, dict):
            raise bad("needs a 'synsets' list, a 'lemmas' object and a 'plurals' object")
        self.synsets: list[tuple[str, np.ndarray]] = []
        for i, entry in enumerate(synsets):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[2], list) and entry[2]):
                raise bad(f"synset {i} is not [id, lemmas, classes]")
            covered = np.asarray(entry[2])
            if covered.dtype.kind not in "iu" or covered.ndim != 1 or covered.min() < 0 or covered.max() >= classes:
                raise bad(f"synset {i} ({entry[0]!r}) names classes outside 0..{classes - 1}")
            self.synsets.append((entry[0], np.unique(covered)))
        self.lemmas: dict[str, list[int]] = {}
        for lemma, senses in lemmas.items():
            if (not isinstance(senses, list) or not senses or len(senses) > _MAX_SENSES
                    or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < len(synsets)
                               for s in senses)):
                raise bad(f"lemma {lemma!r} has senses that are not synset numbers")
            self.lemmas[lemma] = senses
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in plurals.items()):
            raise bad("'plurals' must map words to words")
        self.plurals: dict[str, str] = plurals
        self.classes = classes
        self.min_classes = min_classes

    def synset(self, label: str) -> str | None:
        """The synset id (``n00015388``) a label names, or None (whatever ``min_classes``)."""
        sense = self._sense(label, 1)
        return None if sense is None else self.synsets[sense][0]

    def covered(self, label: str) -> np.ndarray | None:
        """The class indices a label covers, or None when it does not resolve."""
        sense = self._sense(label, self.min_classes)
        return None if sense is None else self.synsets[sense][1]

    def _sense(self, label: str, min_classes: int) -> int | None:
        """The first sense (WordNet's frequency order) of the label's first known form covering min_classes."""
        words = _LEADING.sub("", re.sub(r"[^\w\s'-]", " ", label.lower()).strip())
        words = _PIECE.sub("", " ".join(words.split()))
        if not words:
            return None
        parts = words.split()
        candidates = [words]
        # "a red car" is a car; "crane bird", "rickshaw vehicle", "baby pacifier" name their first word's thing
        if len(parts) == 2 and not any(self.lemmas.get(f) for f in self._forms(parts[0])):
            candidates.append(parts[-1])
        for phrase in candidates:
            for lemma in self._forms(phrase.replace(" ", "_")):
                senses = self.lemmas.get(lemma)
                if senses:  # "plant": the factory covers 1 class, the organism 2; a known form ends the search
                    return next((i for i in senses if len(self.synsets[i][1]) >= min_classes), None)
        return None

    def _forms(self, lemma: str) -> list[str]:
        forms = [lemma]
        if lemma in self.plurals:
            forms.append(self.plurals[lemma])
        # WordNet's morphy rules for nouns (its exception list has the rest: children, mice, ...)
        for suffix, base in (("men", "man"), ("ies", "y"), ("ches", "ch"), ("shes", "sh"), ("ses", "s"), ("xes", "x"),
                             ("zes", "z"), ("s", "")):
            if lemma.endswith(suffix) and len(lemma) > len(suffix) + 1:
                forms.append(lemma[: -len(suffix)] + base)
                break
        return forms

    def masks(self, labels: Sequence[str]) -> list[np.ndarray | None]:
        """Per label, a (classes,) 0/1 float32 mask of the classes it scores by, or None where it does not resolve.

        Each class goes to the most specific labels that cover it (fewest classes); labels too narrow
        to resolve (under ``min_classes``: "beagle") still claim theirs, so that "a dog" beside 100
        breeds keeps only the breeds nobody named. A resolving label left with none keeps its whole set.
        """
        covered = [self.covered(label) for label in labels]
        owner_size = np.full(self.classes, np.iinfo(np.int64).max)
        for label in labels:
            sense = self._sense(label, 1)
            if sense is not None:
                c = self.synsets[sense][1]
                owner_size[c] = np.minimum(owner_size[c], len(c))
        out: list[np.ndarray | None] = []
        for c in covered:
            if c is None:
                out.append(None)
                continue
            mine = c[owner_size[c] == len(c)]
            mask = np.zeros(self.classes, np.float32)
            mask[mine if len(mine) else c] = 1.0
            out.append(mask)
        return out
