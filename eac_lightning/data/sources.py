"""Loading edit requests with ``datasets``: CounterFact (ROME and flat EasyEdit formats), ZsRE (MEND format)
and the project's own JSON/JSONL schema (the fields of :class:`EditRequest`).

A path may be a file, a folder (every ``.json``/``.jsonl`` file in it, sorted) or, when no such path exists, a
hub dataset name (``load_dataset(name, split=...)``), so the offline defaults and the usual hub datasets go
through the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

from eac_lightning.data.requests import EditRequest, MalformedRequestError
from eac_lightning.paths import data_dir, data_source_name, resolve_data_path


def _need(record: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise MalformedRequestError(f"{where}: must be an object with field '{key}', got {type(record).__name__}")
    if key not in record or record[key] is None:
        raise MalformedRequestError(f"{where}: missing field '{key}'")
    return record[key]


def _need_str(record: dict[str, Any], key: str, where: str) -> str:
    value = _need(record, key, where)
    if not isinstance(value, str):
        raise MalformedRequestError(f"{where}: field '{key}' must be a string, got {type(value).__name__} {value!r}"[:300])
    return value


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
    subject = _need_str(rw, "subject", where + " requested_rewrite")
    target_true = rw.get("target_true") or {}
    if not isinstance(target_true, dict):
        raise MalformedRequestError(f"{where}: field 'requested_rewrite.target_true' must be an object")
    return dict(
        prompt=_subject_template(_need_str(rw, "prompt", where), subject, where, "requested_rewrite.prompt"),
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
    subject = _need_str(r, "subject", where)
    loc = _as_list(r.get("locality_prompt"))
    loc_ans = _as_list(r.get("locality_ground_truth"))
    return dict(
        prompt=_subject_template(_need_str(r, "prompt", where), subject, where, "prompt"),
        subject=subject,
        target_new=_need(r, "target_new", where),
        target_true=r.get("ground_truth"),
        paraphrase_prompts=_as_list(r.get("rephrase_prompt")),
        neighborhood_prompts=loc,
        neighborhood_answers=loc_ans,
        case_id=r.get("case_id"),
    )


class NoEditTargetError(MalformedRequestError):
    """A record that is well-formed but has no new target to write: ZsRE's ``alt`` is empty where MEND's
    generator found no alternative answer (2 of the 800 shipped rows, e.g. row 534). There is nothing to edit, so
    loaders skip it with a notice instead of failing."""


def from_zsre(r: dict[str, Any], where: str) -> dict[str, Any]:
    subject = _need_str(r, "subject", where)
    answers = _as_list(r.get("answers"))
    if isinstance(r.get("alt"), str) and not r["alt"].strip():
        raise NoEditTargetError(f"{where}: field 'alt' is empty (ZsRE has no new target for this question)")
    return dict(
        prompt=_subject_template(_need_str(r, "src", where), subject, where, "src"),
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
    """Pick the converter for a record by its keys that hold a value (``datasets`` gives every row of a file the
    union of the keys, so a file mixing formats has null fields of the other formats)."""
    record = {k: v for k, v in record.items() if v is not None}
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


def _read_json_records(file: Path) -> list[Any]:
    """The records of a JSON (a list of records) or JSONL file read with the standard library: the fallback when
    ``datasets`` cannot build a table (fields whose types differ between rows, e.g. one numeric subject), and the
    way to name a syntax error's line and column, which ``datasets`` hides behind "An error occurred while
    generating the dataset". Raises :class:`MalformedRequestError` naming the file and the cause."""
    text = file.read_text(encoding="utf-8", errors="replace")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        whole, first_error = None, err
    else:
        if isinstance(whole, list):
            return whole
        if isinstance(whole, dict):
            return [whole]
        raise MalformedRequestError(f"{file}: cannot be read as JSON/JSONL (its top level is a "
                                    f"{type(whole).__name__}, not a list of records)")
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                where = f"line {i} column {err.colno}" if text.lstrip().startswith("{") else (
                    f"line {first_error.lineno} column {first_error.colno}")
                msg = err.msg if text.lstrip().startswith("{") else first_error.msg
                raise MalformedRequestError(f"{file}: cannot be read as JSON/JSONL ({where}: {msg})") from None
    return records


def _looks_local(path: str) -> bool:
    """A path meant as a local file or folder (not a hub dataset name ``owner/name``)."""
    p = Path(path)
    return (p.suffix in (".json", ".jsonl") or path.startswith((".", "/", "~")) or os.sep + os.sep in path
            or len(p.parts) > 2)


def source_sha256(path: str | os.PathLike, split: str = "train") -> str:
    """sha256 of the edit source: the bytes of every local data file (names included), or a hub name and split."""
    h = hashlib.sha256()
    resolved = resolve_data_path(path)
    if resolved.exists():
        for file in _data_files(resolved):
            h.update(file.name.encode() + b"\0")
            with open(file, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    else:
        h.update(f"hub:{path}:{split}".encode())
    return h.hexdigest()


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
            if file.stat().st_size == 0 or not file.read_text(encoding="utf-8", errors="replace").strip():
                raise MalformedRequestError(f"{file}: is empty; it must hold edit records as JSON or JSONL")
            try:
                ds = datasets.load_dataset("json", data_files=str(file), split="train")
            except Exception:  # datasets wraps parse errors in several exception types
                ds = _read_json_records(file)
            source = data_source_name(file)
            for i, rec in enumerate(ds):
                yield source, i, rec
    else:
        if _looks_local(str(path)):
            raise FileNotFoundError(f"data file or folder {path} does not exist (looked in {Path.cwd()} and in "
                                    f"the data folder {data_dir()})")
        try:
            ds = datasets.load_dataset(str(path), split=split)
        except Exception as err:
            raise FileNotFoundError(f"{path} is neither a local data file or folder (looked in {Path.cwd()} and "
                                    f"in {data_dir()}) nor a loadable hub dataset ({type(err).__name__}: {err})") from err
        for i, rec in enumerate(ds):
            yield str(path), i, rec


def load_requests(
    path: str | os.PathLike, split: str = "train", limit: int | None = None, skip_malformed: bool = False,
    skipped: list[dict[str, Any]] | None = None,
) -> list[EditRequest]:
    """Load and validate edit requests from ``path`` (file, folder or hub dataset name).

    Every record is validated; the first malformed one raises with its file, row and field, unless
    ``skip_malformed``, which leaves it out with a warning naming it and appends ``{"source", "row",
    "reason"}`` to ``skipped``. A record with nothing to edit (:class:`NoEditTargetError`: ZsRE's empty ``alt``)
    is always left out that way.
    """
    out: list[EditRequest] = []
    for source, row, rec in iter_records(path, split):
        where = f"{source} row {row}"
        try:
            fields = detect_format(rec)(rec, where)
            req = EditRequest(**fields, source=source, source_index=row).validate()
        except (MalformedRequestError, TypeError, AttributeError, KeyError, ValueError) as caught:
            err = caught if isinstance(caught, MalformedRequestError) else MalformedRequestError(
                f"{where}: cannot be read as an edit record ({type(caught).__name__}: {caught})")
            if not (skip_malformed or isinstance(err, NoEditTargetError)):
                raise err from None if err is caught else caught
            warnings.warn(f"skipped record: {err}", stacklevel=2)
            if skipped is not None:
                skipped.append({"source": source, "row": row, "reason": str(err)})
            continue
        out.append(req)
        if limit is not None and len(out) >= limit:
            break
    return out
