"""Text->image recall of a dashboard fine column (``--spec``, e.g. ``offline-tops``) through its own search path.

Every caption of the gallery is one ``search_text`` call (teacher shortlist, region x word re-rank),
so this checks that the app's matcher reproduces the ``eval-fine`` numbers, and times it.

    python bench/fine_gallery_recall.py [--spec offline-tops] [--gallery assets/gallery/flickr8k-test] [--json assets/results/fine-gallery-SPEC.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from matcher.atomic import write_json  # noqa: E402
from matcher.eval.costs import machine_description  # noqa: E402
from matcher.data.gallery import open_gallery  # noqa: E402
from matcher.paths import DEFAULT_GALLERY  # noqa: E402
from matcher.registry import open_matcher  # noqa: E402
from matcher.search.protocol import SearchOptions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gallery", default=str(DEFAULT_GALLERY))
    parser.add_argument("--spec", default="offline-tops", help="a fine-rerank config (offline-tops, offline-fine, ...)")
    parser.add_argument("--json", help="default: assets/results/fine-gallery-SPEC.json")
    args = parser.parse_args()
    args.json = args.json or f"assets/results/fine-gallery-{args.spec}.json"
    matcher = open_matcher(args.spec, open_gallery(args.gallery))
    emb = matcher.embeddings
    ranks, latencies = [], []
    for i, caption in enumerate(tqdm(emb.caption_texts, desc="captions")):
        own = emb.names[emb.caption_image[i]]
        result = matcher.search_text(caption, SearchOptions(k=10))
        latencies.append(sum(result.timings_ms.values()))
        names = [h.name for h in result.hits]
        ranks.append(names.index(own) if own in names else 10)
    ranks = np.array(ranks)
    t2i = {f"R@{k}": round(float(100 * np.mean(ranks < k)), 2) for k in (1, 5, 10)}
    report = {"command": "python bench/fine_gallery_recall.py " + " ".join(sys.argv[1:]), "spec": args.spec,
              "gallery": args.gallery, "captions": len(ranks), "machine": machine_description(), "t2i": t2i,
              "query_ms_p50": round(float(np.median(latencies)), 2)}
    print(report)
    write_json(args.json, report)


if __name__ == "__main__":
    main()
