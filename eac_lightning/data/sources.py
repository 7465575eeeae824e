"""Loading edit requests with ``datasets``: CounterFact (ROME and flat EasyEdit formats), ZsRE (MEND format)
and the project's own JSON/JSONL schema (the fields of :class:`EditRequest`).

A path may be a file, a folder (every ``.json``/``.jsonl`` file in it, sorted) or, when no such path exists, a
hub dataset name (``load_dataset(name, split=...)``), so the offline defaults and the usual hub datasets go
through the same code.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

from eac_lightning.data.requests import EditRequest, MalformedRequestError
from eac_lightning.paths import data_source_name, resolve_data_path


def _need(record: dict[str, Any], key: str, where: str) -> Any:
    if key not in record or record[key] is None:
        raise MalformedRequestError(f"{where}: missing field '{key}'")
    return record[key]


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [v for v in value if v is not None]


def _subject_template(prompt: str, subject: str, where: str, field: str) -> str:
    if "{}" in prompt:
        return prompt
    if subject not in prompt:
        raise MalformedRequestError(f"{where}: field '{field}' does not contain the subject {subject!r}: {prompt!r}")
    return prompt.replace(subject, "{}", 1)


def from_rome_counterfact(r: dict[str, Any], where: str) -> dict[str, Any]:
    rw = _need(r, "requested_rewrite", where)
    subject = _need(rw, "subject", where + " requested_rewrite")
    target_true = rw.get("target_true") or {}
    return dict(
        prompt=_subject_template(_need(rw, "prompt", where), subject, where, "requested_rewrite.prompt"),
        subject=subject,
        target_new=_need(_need(rw, "target_new", where), "str", where + " requested_rewrite.target_new"),
        target_true=target_true.get("str"),
        paraphrase_prompts=_as_list(r.get("paraphrase_prompts")),
        neighborhood_prompts=_as_list(r.get("neighborhood_prompts")),
        neighborhood_answers=[target_true["str"]] if target_true.get("str") else [],
        generation_prompts=_as_list(r.get("generation_prompts")),
        case_id=r.get("case_id"),
    )


def from_flat_counterfact(r: dict[str, Any], where: str) -> dict[str, Any]:
    subject = _need(r, "subject", where)
    loc = _as_list(r.get("locality_prompt"))
    loc_ans = _as_list(r.get("locality_ground_truth"))
    return dict(
        prompt=_subject_template(_need(r, "prompt", where), subject, where, "prompt"),
        subject=subject,
        target_new=_need(r, "target_new", where),
        target_true=r.get("ground_truth"),
        paraphrase_prompts=_as_list(r.get("rephrase_prompt")),
        neighborhood_prompts=loc,
        neighborhood_answers=loc_ans,
        case_id=r.get("case_id"),
    )


def from_zsre(r: dict[str, Any], where: str) -> dict[str, Any]:
    subject = _need(r, "subject", where)
    answers = _as_list(r.get("answers"))
    return dict(
        prompt=_subject_template(_need(r, "src", where), subject, where, "src"),
        subject=subject,
        target_new=_need(r, "alt", where),
        target_true=answers[0] if answers else r.get("pred"),
        paraphrase_prompts=_as_list(r.get("rephrase")),
        neighborhood_prompts=_as_list(r.get("loc")),
        neighborhood_answers=_as_list(r.get("loc_ans")),
        case_id=r.get("case_id"),
    )


def from_native(r: dict[str, Any], where: str) -> dict[str, Any]:
    fields = EditRequest.__dataclass_fields__
    out = {k: v for k, v in r.items() if k in fields and k not in ("source", "source_index")}
    for k in ("prompt", "subject", "target_new"):
        _need(r, k, where)
    for k in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers"):
        if k in out:
            out[k] = _as_list(out[k])
    return out


def detect_format(record: dict[str, Any]) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    """Pick the converter for a record by its keys."""
    if "requested_rewrite" in record:
        return from_rome_counterfact
    if "src" in record and "alt" in record:
        return from_zsre
    if "ground_truth" in record or "rephrase_prompt" in record or "locality_prompt" in record:
        return from_flat_counterfact
    if {"prompt", "subject", "target_new"} <= set(record):
        return from_native
    raise MalformedRequestError(
        f"unknown edit-record format with keys {sorted(record)}; expected CounterFact (requested_rewrite), "
        "flat EasyEdit CounterFact (prompt/subject/target_new/ground_truth), ZsRE MEND (subject/src/alt/loc) "
        "or prompt/subject/target_new"
    )


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise FileNotFoundError(f"no .json or .jsonl files in {path}")
        return files
    return [path]


def iter_records(path: str | os.PathLike, split: str = "train") -> Iterable[tuple[str, int, dict[str, Any]]]:
    """Yield (source, row, record) from local JSON/JSONL files or a hub dataset, loaded with ``datasets``."""
    import datasets

    resolved = resolve_data_path(path)
    if resolved.exists():
        for file in _data_files(resolved):
            try:
                ds = datasets.load_dataset("json", data_files=str(file), split="train")
            except Exception as err:  # datasets wraps parse errors in several exception types
                raise MalformedRequestError(f"{file}: cannot be read as JSON/JSONL ({err})") from err
            source = data_source_name(file)
            for i, rec in enumerate(ds):
                yield source, i, rec
    else:
        ds = datasets.load_dataset(str(path), split=split)
        for i, rec in enumerate(ds):
            yield str(path), i, rec


def load_requests(
    path: str | os.PathLike, split: str = "train", limit: int | None = None, skip_malformed: bool = False
) -> list[EditRequest]:
    """Load and validate edit requests from ``path`` (file, folder or hub dataset name).

    Every record is validated; the first malformed one raises with its file, row and field, unless
    ``skip_malformed``, which leaves it out with a warning naming it (e.g. ZsRE row 534 has an empty ``alt``).
    """
    out: list[EditRequest] = []
    for source, row, rec in iter_records(path, split):
        where = f"{source} row {row}"
        try:
            fields = detect_format(rec)(rec, where)
            req = EditRequest(**fields, source=source, source_index=row).validate()
        except MalformedRequestError as err:
            if not skip_malformed:
                raise
            warnings.warn(f"skipped malformed record: {err}", stacklevel=2)
            continue
        out.append(req)
        if limit is not None and len(out) >= limit:
            break
    return out
