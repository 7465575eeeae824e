"""Edits of facts the model does not know, for edit streams longer than the data (docs/long_streams.md).

AlphaEdit's protocol edits 2,000 CounterFact facts and lifelong-editing papers stream 10,000 and more; the offline
testbed knows ~1,300 (500 CounterFact + 800 ZsRE). Editing its facts again with other objects would overwrite
earlier edits and leave nothing to score them against. So the stream continues with *insertions*: each is a real
CounterFact record about an invented entity, whose name is the first half of a subject of the record's relation
followed by an invented surname that no other insertion carries ("Danielle Darrieux" → "Danielle Varnoskel"):

* prompt, paraphrases and generation prompts: the record's, with the invented subject in place of its own (a
  paraphrase without the subject is dropped);
* new object: an object of the record's relation (one of the relation's records' objects, not the record's own
  true object), drawn at random for each insertion, so no part of a name predicts its object;
* ``target_true``: the record's own true object, so CounterFact's probability scores (efficacy score: P(new) >
  P(true)) compare the new object with the answer of the entity the prompt was written about;
* neighbourhood prompts: the record's, unchanged: real facts about other subjects that the edit must not change.

Why a surname of its own: an edit is read at the subject's last token, whose key is mostly the last word. Names
whose last word recurs would let earlier edits stand in for later ones (the same word with the same object: the
later edit is predicted before it is made) or contradict them (the same word with another object). Whether a
stream leaks is measured by ``benchmarks/insertion_leakage.py`` (docs/long_streams.md). Records are taken in
seeded rounds, each round every record once, so a batch mixes records and relations. The surnames are made of
syllables, seeded, and none is a word of a real subject.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Iterable, Iterator

from eac_lightning.data.requests import EditRequest


_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "pr", "r", "s", "st", "t",
           "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "l", "n", "r", "s", "k", "m", "sk", "nd")


def surnames(seed: int, avoid: set[str]) -> Iterator[str]:
    """Distinct invented surnames of two or three syllables ("Varnoskel"), in a seeded order, none in ``avoid``
    (lower-cased words of real subjects). 22 · 8 · 10 = 1,760 syllables: millions of names."""
    rng = random.Random(f"surnames-{seed}")
    made: set[str] = set()
    while True:
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(rng.choice((2, 3)))).capitalize()
        if name.lower() not in avoid and name not in made:
            made.add(name)
            yield name


def first_half(subject: str) -> str:
    """The first half of a subject's words (at least one)."""
    words = subject.split()
    return " ".join(words[: max(1, len(words) // 2)])


def _swap(prompts: Iterable[str], old: str, new: str) -> list[str]:
    return [p.replace(old, new) for p in prompts if old in p]


def insertion_requests(requests: list[EditRequest], relations: dict[tuple[Any, Any], Any], n: int,
                       seed: int = 0) -> list[EditRequest]:
    """``n`` insertion requests made from ``requests`` (the source's records, validated; see the module docstring).
    The first ``n`` of a longer call are these ``n``.

    Args:
        requests: the records to build on (CounterFact's, or any with prompts and objects).
        relations: ``{(source, source_index): relation}`` (CounterFact's ``relation_id``); a record without one is
            grouped by its prompt template.
        n: how many to make.
        seed: the order of the records, the names and the objects.

    Raises ValueError when no record's relation has an object other than the record's own true one.
    """
    if n <= 0:
        return []
    relation_of = [relations.get((r.source, r.source_index)) or r.prompt for r in requests]
    group: dict[Any, list[int]] = defaultdict(list)
    for i, relation in enumerate(relation_of):
        group[relation].append(i)
    objects = {key: sorted({o for i in members for o in (requests[i].target_new, requests[i].target_true) if o})
               for key, members in group.items()}
    usable = [i for i, r in enumerate(requests) if any(o != r.target_true for o in objects[relation_of[i]])]
    if not usable:
        raise ValueError(f"the {len(requests)} records give no relation an object other than a record's own true "
                         "one: no insertion can be made from them")
    rng = random.Random(seed)
    names = surnames(seed, {w.lower() for r in requests for w in r.subject.split()})
    out: list[EditRequest] = []
    while len(out) < n:
        order = list(usable)
        rng.shuffle(order)  # one round: every usable record once
        for i in order:
            if len(out) == n:
                break
            a = requests[i]
            members = group[relation_of[i]]
            subject = f"{first_half(requests[rng.choice(members)].subject)} {next(names)}"
            target = rng.choice([o for o in objects[relation_of[i]] if o != a.target_true])
            k = len(out)
            out.append(EditRequest(
                prompt=a.prompt, subject=subject, target_new=target, target_true=a.target_true,
                paraphrase_prompts=_swap(a.paraphrase_prompts, a.subject, subject),
                neighborhood_prompts=list(a.neighborhood_prompts), neighborhood_answers=list(a.neighborhood_answers),
                generation_prompts=_swap(a.generation_prompts, a.subject, subject),
                case_id=f"insertion-{k}", source=f"insertions({a.source})", source_index=k,
            ))
    return out
