"""Index a folder of images, then search it with text.

    python examples/folder_search.py ./photos "a red car" "a dog on a sofa"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import edgemm

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("queries", nargs="+")
    parser.add_argument("--bundle", default=None)
    parser.add_argument("-k", type=int, default=3)
    args = parser.parse_args()

    paths = sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in SUFFIXES)
    if not paths:
        raise SystemExit(f"no images in {args.folder}")
    model = edgemm.load(args.bundle)
    index = edgemm.VectorIndex(dim=model.dim)
    index.add(model.embed_images([str(p) for p in paths]), ids=[str(p) for p in paths])
    for query, hits in zip(args.queries, index.search(model.embed_texts(args.queries), k=args.k)):
        print(f"{query!r}:")
        for hit in hits:
            print(f"  {hit.score:.3f}  {hit.id}")


if __name__ == "__main__":
    main()
