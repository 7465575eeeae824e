"""The testbed's training corpus, built from real records only.

What goes in (the recipe follows what earlier testbed experiments found, docs/testbed.md):

* **Facts** from CounterFact (ROME and flat EasyEdit formats) and ZsRE (MEND format), read with
  the format converters of :mod:`eac_lightning.data.sources`. Each record's *true* fact is trained under its own prompt,
  under other templates of the same relation (Meng et al., 2022, "Locating and Editing Factual Associations in
  GPT", §2: facts stored as subject → attribute associations that every phrasing reads), under its first
  paraphrase; the other paraphrases are held out to measure generalisation. The neighbourhood / locality prompts
  (CounterFact neighbours, ZsRE's Natural Questions) are trained with their answers so that locality is measured
  on knowledge the model really has. CounterFact's attribute prompts (other subjects whose true object is the
  record's ``target_new``) are trained too, so the new object of an edit is an answer the model can give.
* **WikiText-2** (Merity et al., 2017) for language: the *valid* split is trained, the *test* split is kept for
  perplexity.
* **SST-2** (Socher et al., 2013; GLUE dev split): half of it under the sentiment prompt of the EAC paper
  (Xu et al., 2025, Table 4), the other half held out, so one downstream ability is measurable.

The corpus is packed into training blocks by :mod:`eac_lightning.testbed.packing`.

Relations are not named by every format (ZsRE and flat CounterFact have no relation id), so templates are grouped
by a union-find over the templates a record exposes (its prompt and trained paraphrases, each with the subject
replaced by ``{}``): templates that phrase the same record's fact belong to the same relation.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from eac_lightning.data.requests import EditRequest, MalformedRequestError
from eac_lightning.data.sources import detect_format, iter_records
from eac_lightning.evaluation.tasks import LABEL_WORDS, format_sentiment
from eac_lightning.paths import data_dir, resolve_data_path

#: Default fact files (resolved under the offline data folder).
DEFAULT_FACT_PATHS = ("counterfact", "zsre")

#: Kinds of trained prompts.
KINDS = ("fact", "template", "paraphrase", "neighbourhood", "attribute")

# Boundaries after which a CounterFact paraphrase's random prefix ends and its template starts.
_SENTENCE_END = re.compile(r"(?:[.!?:;]\s+|\n)")


@dataclass(frozen=True)
class FactItem:
    """One prompt → answer pair of the testbed (trained or held out).

    Attributes:
        prompt: the full prompt text, subject filled in (``"Angola is located in"``).
        target: the answer; the model should continue the prompt with ``" " + target``.
        kind: ``fact`` (the record's own prompt), ``template`` (another template of its relation),
            ``paraphrase`` (a trained paraphrase), ``heldout_paraphrase``, ``neighbourhood``, ``attribute``
            (a CounterFact attribute prompt: another subject whose true object is the record's ``target_new``).
        subject: the subject the prompt is about (``None`` when it could not be recovered, e.g. NQ questions).
        source: the file the record came from.
        record_id: the record's ``case_id`` when it has one, else its row in ``source``.
        case: index of the record in :attr:`Corpus.requests`.
    """

    prompt: str
    target: str
    kind: str
    subject: str | None
    source: str
    record_id: int | str | None
    case: int

    @property
    def text(self) -> str:
        """The training sentence: prompt, answer and a full stop."""
        return f"{self.prompt} {self.target}."

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Corpus:
    """Everything a testbed is trained and measured on."""

    requests: list[EditRequest]
    train_facts: list[FactItem]
    heldout_facts: list[FactItem]
    wikitext_train: list[str]
    wikitext_test: str
    sst2_train: list[tuple[str, int]]
    sst2_heldout: list[tuple[str, int]]
    stats: dict = field(default_factory=dict)

    def facts_of_kind(self, *kinds: str, trained: bool = True) -> list[FactItem]:
        pool = self.train_facts if trained else self.heldout_facts
        return [f for f in pool if f.kind in kinds]

    def sst2_texts(self, heldout: bool = False) -> list[str]:
        """SST-2 examples under the evaluated sentiment prompt (EAC Table 4): as training texts (prompt + label
        word) or, held out, as prompts only."""
        rows = self.sst2_heldout if heldout else self.sst2_train
        if heldout:
            return [format_sentiment(t) for t, _ in rows]
        return [f"{format_sentiment(t)} {LABEL_WORDS['sst2'][y]}" for t, y in rows]

    def tokenizer_texts(self, answer_repeats: int = 0) -> list[str]:
        """The texts a tokenizer is trained on: every trained text (never the held-out or test ones), plus each
        distinct answer of the fact set (the true objects and the edit targets) ``answer_repeats`` times.

        Why the answer lexicon: in GPT-2's 50k vocabulary CounterFact's objects (countries, cities, languages,
        companies) are mostly one token, so an edit target is one prediction at the last prompt token. A 2k-8k
        vocabulary trained on this small corpus splits rare objects into 3-5 pieces, and every piece after the first
        is then decided by the language model, not by the subject, which an edit at the subject cannot reach.
        Weighting the answers in the BPE statistics gives them whole-word tokens again.
        """
        texts = [f.text for f in self.train_facts] + self.wikitext_train + self.sst2_texts()
        if answer_repeats > 0:
            answers = sorted({f.target.strip() for f in self.train_facts} | {r.target_new.strip() for r in self.requests})
            texts += [" ".join([a] * answer_repeats) for a in answers if a]
        return texts


def read_sst2(path: str | os.PathLike) -> list[tuple[str, int]]:
    """GLUE SST-2 dev TSV (header ``text<TAB>label``), read with quoting off as the provenance note says."""
    rows: list[tuple[str, int]] = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        ti, li = header.index("sentence") if "sentence" in header else header.index("text"), header.index("label")
        for row in reader:
            if len(row) > max(ti, li) and row[li].strip() in ("0", "1"):
                rows.append((row[ti].strip(), int(row[li])))
    return rows


def read_wikitext(path: str | os.PathLike, min_chars: int = 40) -> list[str]:
    """WikiText-2 paragraphs (section headings and short lines dropped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if len(line) >= min_chars and not line.startswith("="):
            out.append(line)
    return out


def _template(prompt: str, subject: str) -> str | None:
    """The relation template of a prompt: the sentence holding the subject, the subject replaced by ``{}``.

    CounterFact paraphrases carry a random generated prefix (``"Plaque - located at ... . Angola belongs to the
    continent of"``); the template is what follows the last sentence boundary before the subject.
    """
    if "{}" in prompt:
        prompt = prompt.replace("{}", subject, 1)
    pos = prompt.find(subject)
    if pos < 0:
        return None
    start = 0
    for m in _SENTENCE_END.finditer(prompt, 0, pos):
        start = m.end()
    core = prompt[start:]
    return core.replace(subject, "{}", 1).strip()


def _match_subject(prompt: str, templates: Sequence[str]) -> str | None:
    """The subject of ``prompt`` if it is one of ``templates`` filled in (the template with the most fixed text
    wins); ``None`` otherwise."""
    best, best_len = None, 0
    for t in templates:
        pre, _, suf = t.partition("{}")
        fixed = len(pre) + len(suf)
        if fixed > best_len and len(suf) >= 3 and len(prompt) > fixed and prompt.startswith(pre) and prompt.endswith(suf):
            subj = prompt[len(pre) : len(prompt) - len(suf)].strip()
            if subj:
                best, best_len = subj, fixed
    return best


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # Deterministic root choice (lexicographic) so the clusters never depend on dict order.
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


@dataclass
class FactRecords:
    """The usable fact records of the fact files.

    Attributes:
        requests: one :class:`EditRequest` per record.
        attribute_prompts: per record, CounterFact's ``attribute_prompts`` (ROME format only): prompts of other
            subjects, same relation, whose true object is the record's ``target_new``.
        skipped: records left out (malformed, or without a true object).
    """

    requests: list[EditRequest]
    attribute_prompts: list[list[str]]
    skipped: int


def load_fact_records(
    paths: Sequence[str | os.PathLike] | None = None, max_per_path: int | None = None
) -> FactRecords:
    """Read the fact records of every path (file or folder), in the formats :mod:`eac_lightning.data.sources` reads.

    Unlike :func:`~eac_lightning.data.sources.load_requests`, which stops at the first malformed record (right for
    an edit run), a testbed skips records that could not be edited (e.g. row 534 of the shipped ZsRE file has an
    empty ``alt``) or that have no true object to train, and counts them. ``max_per_path`` keeps the first usable
    records of each path (the ``tiny`` preset's smaller fact set).
    """
    paths = list(paths) if paths else [data_dir() / p for p in DEFAULT_FACT_PATHS]
    out = FactRecords([], [], 0)
    for p in paths:
        kept = 0
        for source, row, rec in iter_records(resolve_data_path(p)):
            if max_per_path is not None and kept >= max_per_path:
                break
            where = f"{source} row {row}"
            try:
                req = EditRequest(**detect_format(rec)(rec, where), source=source, source_index=row).validate()
            except MalformedRequestError:
                out.skipped += 1
                continue
            if not (req.target_true and req.target_true.strip()):
                out.skipped += 1
                continue
            out.requests.append(req)
            out.attribute_prompts.append([a for a in (rec.get("attribute_prompts") or []) if a and a.strip()])
            kept += 1
    return out


def load_fact_requests(
    paths: Sequence[str | os.PathLike] | None = None, max_per_path: int | None = None
) -> list[EditRequest]:
    """The edit requests of :func:`load_fact_records` (the facts a testbed built from ``paths`` knows)."""
    return load_fact_records(paths, max_per_path).requests


def build_corpus(
    fact_paths: Sequence[str | os.PathLike] | None = None,
    *,
    max_facts_per_path: int | None = None,
    extra_templates: int = 2,
    neighbours_per_fact: int | None = None,
    attributes_per_fact: int | None = None,
    wikitext_paragraphs: int | None = None,
    seed: int = 0,
    data_folder: str | os.PathLike | None = None,
) -> Corpus:
    """Assemble the corpus from real records.

    Args:
        fact_paths: CounterFact / ZsRE files or folders; default the shipped ``counterfact`` and ``zsre`` folders.
        max_facts_per_path: keep only the first records of each path.
        extra_templates: how many other templates of the same relation each fact is also trained under.
        neighbours_per_fact: how many neighbourhood prompts of each record are trained (all when ``None``).
        attributes_per_fact: how many CounterFact attribute prompts (true object = the record's ``target_new``)
            of each record are trained (all when ``None``).
        wikitext_paragraphs: keep only the first WikiText-2 valid paragraphs.
        seed: seeds the choice of templates and the SST-2 split.
        data_folder: where ``wikitext/`` and ``sst2/`` are (default: the package's offline data folder).

    Returns:
        The :class:`Corpus`; facts are deduplicated by prompt (the first answer wins, conflicts are counted in
        ``stats``), and a held-out prompt that also occurs among trained prompts is dropped from the held-out set.
    """
    rng = np.random.default_rng(seed)
    data = Path(data_folder) if data_folder else data_dir()
    records = load_fact_records(fact_paths, max_facts_per_path)
    requests, skipped = records.requests, records.skipped

    def record_id(r: EditRequest) -> int | str | None:
        return r.case_id if r.case_id is not None else r.source_index

    # Held-out paraphrases: paraphrase[1:] (CounterFact has two, paraphrase[1] is held out as in the issue);
    # a record with a single paraphrase (ZsRE's rephrase) keeps it held out.
    def split_paraphrases(r: EditRequest) -> tuple[list[str], list[str]]:
        ps = r.paraphrase_prompts
        return (ps[:1], ps[1:]) if len(ps) >= 2 else ([], list(ps))

    # Relation clusters from trained phrasings only, so a held-out paraphrase's template never joins them
    # through its own record.
    uf = _UnionFind()
    rec_templates: list[list[str]] = []
    for r in requests:
        trained_ps, _ = split_paraphrases(r)
        own = _template(r.prompt, r.subject) or r.prompt
        # A paraphrase whose random prefix has no sentence boundary yields a long "template" that is mostly
        # noise; only short ones join the relation's templates.
        ts = [own] + [t for t in (_template(p, r.subject) for p in trained_ps) if t and len(t.split()) <= 10]
        for t in ts[1:]:
            uf.union(ts[0], t)
        uf.find(ts[0])
        rec_templates.append(ts)
    clusters: dict[str, list[str]] = {}
    for t in sorted(uf.parent):
        clusters.setdefault(uf.find(t), []).append(t)

    train: list[FactItem] = []
    held: list[FactItem] = []
    seen: dict[str, str] = {}
    conflicts = 0

    def add(item: FactItem) -> None:
        nonlocal conflicts
        key = item.prompt.strip()
        if key in seen:
            conflicts += seen[key] != item.target
            return
        seen[key] = item.target
        train.append(item)

    for ci, r in enumerate(requests):
        src, rid, subj, tgt = r.source or "", record_id(r), r.subject, r.target_true.strip()
        trained_ps, held_ps = split_paraphrases(r)
        add(FactItem(r.prompt_text, tgt, "fact", subj, src, rid, ci))
        for p in trained_ps:
            add(FactItem(p, tgt, "paraphrase", subj, src, rid, ci))
        own = set(rec_templates[ci])
        held_templates = {_template(p, subj) for p in held_ps}
        others = [t for t in clusters[uf.find(rec_templates[ci][0])] if t not in own and t not in held_templates]
        if others and extra_templates > 0:
            pick = rng.choice(len(others), size=min(extra_templates, len(others)), replace=False)
            for i in sorted(pick):
                add(FactItem(others[i].replace("{}", subj, 1), tgt, "template", subj, src, rid, ci))
        for p in held_ps:
            held.append(FactItem(p, tgt, "heldout_paraphrase", subj, src, rid, ci))
    # Neighbourhood prompts after all facts, so a record's own phrasing wins any duplicate. CounterFact's
    # neighbours are other subjects under templates of the same relation; matching the templates recovers their
    # subject (the subject-bottleneck mask needs it). ZsRE's NQ questions have none.
    all_templates = sorted(uf.parent, key=len, reverse=True)
    for ci, r in enumerate(requests):
        pairs = [(p, a) for p, a in r.neighborhood_pairs() if a and a.strip()]
        if neighbours_per_fact is not None:
            pairs = pairs[:neighbours_per_fact]
        own_cluster = clusters[uf.find(rec_templates[ci][0])]
        for p, a in pairs:
            subj = _match_subject(p, own_cluster) or _match_subject(p, all_templates)
            add(FactItem(p, a.strip(), "neighbourhood", subj, r.source or "", record_id(r), ci))
    # CounterFact's attribute prompts: other subjects whose true object is the record's target_new. They make
    # target_new a known answer of the relation, as it is for the large LMs CounterFact was written for; a
    # subject-site edit can only select among the answers the model's read-out knows (measured: on a testbed
    # without them, v* at the subject could not lower the target NLL of never-seen objects).
    for ci, r in enumerate(requests):
        prompts = records.attribute_prompts[ci]
        if attributes_per_fact is not None:
            prompts = prompts[:attributes_per_fact]
        own_cluster = clusters[uf.find(rec_templates[ci][0])]
        for p in prompts:
            subj = _match_subject(p, own_cluster) or _match_subject(p, all_templates)
            add(FactItem(p, r.target_new.strip(), "attribute", subj, r.source or "", record_id(r), ci))
    held = [h for h in held if h.prompt.strip() not in seen]

    wiki = read_wikitext(data / "wikitext" / "wikitext-2_valid.txt")
    if wikitext_paragraphs is not None:
        wiki = wiki[:wikitext_paragraphs]
    wiki_test = (data / "wikitext" / "wikitext-2_test.txt").read_text(encoding="utf-8")

    sst = read_sst2(data / "sst2" / "dev.tsv")
    order = np.random.default_rng(seed + 1).permutation(len(sst))
    half = len(sst) // 2
    sst_train = [sst[i] for i in sorted(order[:half])]
    sst_held = [sst[i] for i in sorted(order[half:])]

    stats = {
        "records": len(requests),
        "records_skipped": skipped,
        "trained_prompts": len(train),
        "heldout_prompts": len(held),
        "prompt_conflicts_dropped": int(conflicts),
        "relation_clusters": len(clusters),
        "by_kind": {k: sum(f.kind == k for f in train) for k in KINDS},
        "wikitext_paragraphs": len(wiki),
        "sst2_train": len(sst_train),
        "sst2_heldout": len(sst_held),
    }
    return Corpus(requests, train, held, wiki, wiki_test, sst_train, sst_held, stats)
