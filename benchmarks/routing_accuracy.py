"""How often nearest-source routing finds a passage's true article: title index vs opening-text index.

The paper routes a prompt to the source whose *title* embedding (all-MiniLM-L6-v2) is closest. This
measures that choice on the shared corpus against the alternative `nulls route-index --from opening`
offers, embedding each source's opening text instead.

Data: every article of ``../shared/data/wikitext2/{valid,test}.txt`` (an article starts at a line
`` = Title = ``; WikiText's `` @-@ ``-style escapes are undone) and of
``../shared/data/enwiki/articles_2018.jsonl`` (title/text; the leading title line of the text is
dropped, so the opening holds no title). Titles are deduplicated (first seen kept). An article needs
at least ``MIN_WORDS`` (250) words of body.

Per article, split on whitespace into words:
- opening: words[0:100] (what the opening index embeds);
- held-out passage: words[n//2 : n//2 + 100], a 100-word window from the start of the second half,
  so it never overlaps the opening (n >= 250 means it starts at word 125 or later);
- the query is the passage; it is correct when its top-1 source is its own article.

Both indexes are written and queried by the production code (``EmbeddingWriter`` float16 rows,
``SourceIndex.nearest``). Ends with ``RESULT title_top1=0.xx opening_top1=0.xx``.

By default 1,000 of the 2,300 usable articles are drawn with seed 0: embedding 100-word texts runs at
only ~10-15 per second on 2 busy CPU cores, so the whole corpus takes ~7 minutes (``--max-articles 0``).
Accuracy falls as candidates are added, so compare runs at the same ``--max-articles``.

    python benchmarks/routing_accuracy.py [--max-articles N] [--seed S]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nulls_megatron.routing.embedder import embed, load_embedder  # noqa: E402
from nulls_megatron.routing.source_index import (  # noqa: E402
    EMBEDDINGS, EmbeddingWriter, SourceIndex, replace_index_dir, write_index_json,
)

DATA = ROOT.parent / "shared" / "data"
WINDOW = 100  # words in the opening and in the held-out passage
MIN_WORDS = 250
_HEADING = re.compile(r"^ = ([^=].*?) = $")
_ESCAPES = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}


def wikitext_articles(path: Path) -> list[tuple[str, str]]:
    """(title, body) of every article of a WikiText file (sub-headings `` = = x = = `` stay in the body)."""
    articles: list[tuple[str, list[str]]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _HEADING.match(line)
        if m:
            articles.append((m.group(1).strip(), []))
        elif articles and line.strip():
            text = line.strip()
            for escape, plain in _ESCAPES.items():
                text = text.replace(escape, plain)
            articles[-1][1].append(text)
    return [(title, " ".join(lines)) for title, lines in articles]


def enwiki_articles(path: Path) -> list[tuple[str, str]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            a = json.loads(line)
            text = a["text"]
            first, _, rest = text.partition("\n")
            out.append((a["title"], rest if first.strip() == a["title"].strip() else text))
    return out


def load_corpus() -> list[tuple[str, str, str]]:
    """(corpus name, title, body) of every usable article, titles deduplicated."""
    paths = [DATA / "wikitext2" / "valid.txt", DATA / "wikitext2" / "test.txt", DATA / "enwiki" / "articles_2018.jsonl"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"routing_accuracy: missing data {missing}; the shared corpus lives in {DATA}")
    seen, out = set(), []
    for path in paths:
        name = "wikitext2" if path.suffix == ".txt" else "enwiki"
        reader = wikitext_articles if name == "wikitext2" else enwiki_articles
        for title, body in reader(path):
            key = title.casefold()
            if key not in seen and len(body.split()) >= MIN_WORDS:
                seen.add(key)
                out.append((name, title, body))
    return out


def write_index(folder: Path, kind: str, texts: list[str], batch: int = 256) -> float:
    """Embed ``texts`` into ``folder/routing`` with the production writer; returns seconds."""
    from tqdm import tqdm

    start = time.perf_counter()
    with replace_index_dir(folder) as tmp:
        writer = EmbeddingWriter(tmp / EMBEDDINGS, len(texts))
        for lo in tqdm(range(0, len(texts), batch), desc=f"embed {kind}s", unit="batch", leave=False):
            writer.write(np.arange(lo, min(lo + batch, len(texts))), embed(texts[lo : lo + batch]))
        write_index_json(tmp, kind, "benchmark", len(texts), writer.close(), WINDOW if kind == "opening" else None)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-articles", type=int, default=1000,
                        help="subsample this many articles with --seed (default: %(default)s; 0 = all 2,300, ~7 min on 2 cores)")
    parser.add_argument("--seed", type=int, default=0, help="subsampling seed")
    args = parser.parse_args(argv)

    corpus = load_corpus()
    if args.max_articles and len(corpus) > args.max_articles:
        corpus = random.Random(args.seed).sample(corpus, args.max_articles)
        print(f"subsampled {args.max_articles} articles with seed {args.seed}")
    words = [body.split() for _, _, body in corpus]
    titles = [title for _, title, _ in corpus]
    openings = [" ".join(w[:WINDOW]) for w in words]
    passages = [" ".join(w[len(w) // 2 : len(w) // 2 + WINDOW]) for w in words]
    n = len(corpus)
    by_corpus = {c: sum(1 for x in corpus if x[0] == c) for c in ("wikitext2", "enwiki")}
    print(f"articles: {n} ({by_corpus['wikitext2']} WikiText-2, {by_corpus['enwiki']} enwiki 2018) with >= {MIN_WORDS} "
          f"words; opening = words[0:{WINDOW}], passage = words[n//2 : n//2+{WINDOW}]; chance = {1 / n:.5f}")

    t = time.perf_counter()
    load_embedder()
    print(f"MiniLM load: {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    queries = embed(passages)
    t_queries = time.perf_counter() - t
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, texts in (("title", titles), ("opening", openings)):
            folder = Path(tmp) / kind
            build_s = write_index(folder, kind, texts)
            index = SourceIndex.open(folder, "benchmark")
            t = time.perf_counter()
            chosen, scores = index.nearest(queries)
            query_s = time.perf_counter() - t
            hit = chosen == np.arange(n)
            results[kind] = hit.mean()
            per = {c: hit[[i for i, x in enumerate(corpus) if x[0] == c]].mean() for c in by_corpus if by_corpus[c]}
            print(f"{kind:>7} index: top-1 {hit.mean():.3f} ({hit.sum()}/{n}; "
                  + ", ".join(f"{c} {v:.3f}" for c, v in per.items())
                  + f"), mean cosine of the choice {scores.mean():.3f}; embedding {n} {kind}s {build_s:.1f}s "
                    f"({n / build_s:.0f}/s), top-1 search {query_s * 1000:.1f} ms for {n} queries")
            results[kind + "_hits"] = hit
            misses = np.flatnonzero(~hit)[:4]
            print("         e.g. misses: " + "; ".join(f"{titles[i]!r} -> {titles[chosen[i]]!r}" for i in misses))
    both = results["title_hits"] & results["opening_hits"]
    either = results["title_hits"] | results["opening_hits"]
    print(f"passages embedded in {t_queries:.1f}s ({n / t_queries:.0f}/s); both right {both.mean():.3f}, "
          f"either right {either.mean():.3f}; opening/title accuracy ratio {results['opening'] / results['title']:.2f}")
    print(f"RESULT title_top1={results['title']:.2f} opening_top1={results['opening']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
