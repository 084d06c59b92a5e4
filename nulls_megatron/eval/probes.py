"""Cloze probes for the Truth Ratio: a prompt, its true completion and distractors of the same kind.

From a JSONL file (one probe per line: ``source``, ``prompt``, ``answer``, ``distractors`` [list],
optional ``kind``: ``unique`` or ``shared``), or built automatically from the documents:

- a *fact* is a number (``\\d{3,4}``, e.g. a year) or a named entity (two or more capitalised words)
  inside a sentence of a forget document; the prompt is the document's title and the sentence up to
  the fact, the answer the fact;
- distractors are facts of the same kind and length class from other sources (a seeded draw);
- a probe is *shared* when a retained document holds the answer in a sentence that also holds one of
  the prompt's content words (longer than 3 letters): a model retrained without the source could
  still know it. Otherwise it is *unique* to its source.

The builder is deliberately simple (regexes, no tagger): it gives many probes on any text, and the
JSONL path takes hand-written ones.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .documents import Document, jsonl_records

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_NUMBER = re.compile(r"(?<![\w.])(\d{3,4})(?![\w.]\d)")
_ENTITY = re.compile(r"(?<!^)(?<![.!?]\s)\b([A-Z][a-z]+(?:\s+[A-Z][a-z]+)+)")
_WORD = re.compile(r"[A-Za-z]{4,}")
KINDS = ("unique", "shared")


@dataclass
class Probe:
    source: int
    prompt: str
    answer: str
    distractors: list[str]
    kind: str = "unique"
    fact_type: str = field(default="", compare=False)

    def to_json(self) -> dict:
        return asdict(self)


def read_probes(path: str | Path) -> list[Probe]:
    def parse(record: dict) -> Probe:
        probe = Probe(int(record["source"]), str(record["prompt"]), str(record["answer"]),
                      [str(d) for d in record["distractors"]], str(record.get("kind", "unique")))
        if probe.kind not in KINDS or not probe.distractors:
            raise ValueError(f"kind must be one of {KINDS} and distractors non-empty")
        return probe

    return jsonl_records(path, parse, "a probe needs source, prompt, answer, distractors and a valid kind")


def _facts(text: str) -> list[tuple[str, str, str]]:
    """(sentence prefix, fact, fact type) of every number and entity in ``text``."""
    out = []
    for sentence in _SENTENCE.split(text.replace("\n", " ")):
        for kind, pattern in (("number", _NUMBER), ("entity", _ENTITY)):
            for m in pattern.finditer(sentence):
                prefix = sentence[: m.start()].rstrip()
                if len(prefix.split()) >= 3:
                    out.append((prefix, m.group(1), kind))
    return out


def _sentences_with(texts: Sequence[str], answer: str) -> list[str]:
    return [s for t in texts if answer in t for s in _SENTENCE.split(t.replace("\n", " ")) if answer in s]


def build_probes(forget: Sequence[Document], forget_texts: Sequence[str], retain_texts: Sequence[str],
                 per_source: int = 5, distractors: int = 4, seed: int = 0) -> list[Probe]:
    """Up to ``per_source`` probes per forget document (see the module doc)."""
    rng = np.random.default_rng(seed)
    facts = [_facts(t) for t in forget_texts]
    retain_facts = [f for t in retain_texts for f in _facts(t)]
    probes = []
    for doc, own in zip(forget, facts):
        others = {(f, k) for _, f, k in retain_facts} | {(f, k) for other in facts if other is not own for _, f, k in other}
        seen = set()
        for prefix, answer, kind in own:
            if answer in seen or len(probes) and sum(p.source == doc.source for p in probes) >= per_source:
                continue
            pool = sorted({f for f, k in others if k == kind and f != answer
                           and (kind != "number" or len(f) == len(answer))})
            if len(pool) < distractors:
                continue
            seen.add(answer)
            words = {w.lower() for w in _WORD.findall(prefix)}
            shared = any(words & {w.lower() for w in _WORD.findall(s)} for s in _sentences_with(retain_texts, answer))
            picked = [pool[i] for i in rng.choice(len(pool), size=distractors, replace=False)]
            probes.append(Probe(doc.source, f"{doc.title}. {prefix}", answer, picked,
                                "shared" if shared else "unique", kind))
    return probes
