"""Edits of facts the model does not know, for edit streams longer than the data (docs/long_streams.md).

AlphaEdit's protocol edits 2,000 CounterFact facts and lifelong-editing papers stream 10,000 and more; the offline
testbed knows ~1,300 (500 CounterFact + 800 ZsRE). Editing its facts again with other objects would overwrite
earlier edits and leave nothing to score them against. So the stream continues with *insertions*: each is a real
CounterFact record whose subject is replaced by an invented one, made from the first half of the record's subject
words and the second half of another subject's of the same relation ("Danielle Darrieux" + "Toko Yasuda" →
"Danielle Yasuda"), so that every insertion is a distinct entity the model has never seen, of the relation's type.

* prompt, paraphrases and generation prompts: the record's, with the invented subject in place of its own (a
  paraphrase without the subject is dropped);
* new object: the other record's ``target_new``, an object of the same relation (CounterFact draws its targets
  from the relation's objects too);
* ``target_true``: the record's own true object, so CounterFact's probability scores (efficacy score: P(new) >
  P(true)) compare the new object with the answer of the entity the prompt was written about;
* neighbourhood prompts: the record's, unchanged: real facts about other subjects that the edit must not change.

Subject pairs come from the same relation first (8,660 ordered pairs in the shipped 500 records, 7,440 distinct
subjects), then from two records drawn at random; the order is seeded. An invented subject that equals a real subject, or one already made, is skipped.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Iterable

from eac_lightning.data.requests import EditRequest


def invented_subject(a: str, b: str) -> str:
    """The first half of ``a``'s words (at least one) and the second half of ``b``'s (at least one)."""
    wa, wb = a.split(), b.split()
    return " ".join(wa[: max(1, len(wa) // 2)] + wb[len(wb) // 2:])


def _swap(prompts: Iterable[str], old: str, new: str) -> list[str]:
    return [p.replace(old, new) for p in prompts if old in p]


def insertion_requests(requests: list[EditRequest], relations: dict[tuple[Any, Any], Any], n: int,
                       seed: int = 0) -> list[EditRequest]:
    """``n`` insertion requests made from ``requests`` (the source's records, validated).

    Args:
        requests: the records to build on (CounterFact's, or any with prompts and objects).
        relations: ``{(source, source_index): relation}`` (CounterFact's ``relation_id``); a record without one is
            grouped by its prompt template.
        n: how many to make.
        seed: the order of the subject pairs.

    Raises ValueError when the records cannot make ``n`` distinct subjects.
    """
    if n <= 0:
        return []
    group: dict[Any, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        group[relations.get((r.source, r.source_index)) or r.prompt].append(i)
    rng = random.Random(seed)
    same = [(i, j) for members in group.values() for i in members for j in members if i != j]
    rng.shuffle(same)
    taken = {r.subject for r in requests}
    out: list[EditRequest] = []

    def add(i: int, j: int, target: str) -> None:
        a = requests[i]
        subject = invented_subject(a.subject, requests[j].subject)
        if subject in taken or target == a.target_true:
            return
        taken.add(subject)
        k = len(out)
        out.append(EditRequest(
            prompt=a.prompt, subject=subject, target_new=target, target_true=a.target_true,
            paraphrase_prompts=_swap(a.paraphrase_prompts, a.subject, subject),
            neighborhood_prompts=list(a.neighborhood_prompts), neighborhood_answers=list(a.neighborhood_answers),
            generation_prompts=_swap(a.generation_prompts, a.subject, subject),
            case_id=f"insertion-{k}", source=f"insertions({a.source})", source_index=k,
        ))

    for i, j in same:
        if len(out) == n:
            return out
        add(i, j, requests[j].target_new)
    # Cross-relation pairs (the subject mixes types, the object comes from the record's own relation), drawn at
    # random so that a batch of consecutive insertions mixes records and relations as the same-relation ones do:
    # walking them record by record would give a hundred "Helen <x>" subjects with one prompt and a hundred
    # targets in one batch. The draw stops once ``patience`` pairs in a row made no new subject.
    patience, misses = 50 * len(requests), 0
    while len(out) < n and misses < patience and len(requests) > 1:
        i, j = rng.randrange(len(requests)), rng.randrange(len(requests))
        members = group[relations.get((requests[i].source, requests[i].source_index)) or requests[i].prompt]
        before = len(out)
        if i != j:
            add(i, j, requests[members[j % len(members)]].target_new)
        misses = 0 if len(out) > before else misses + 1
    if len(out) < n:
        raise ValueError(f"{len(requests)} records make only {len(out)} distinct insertion subjects, {n} asked for")
    return out
