"""The edit request record and its validation.

A request is checked completely before any weight changes (no half-applied edit): a malformed record raises
:class:`MalformedRequestError` naming the record and the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: The longest text field a record may have: a longer one is refused before it is tokenised (a 50 MB field would
#: otherwise take gigabytes on its way to the context-length check).
MAX_FIELD_CHARS = 10_000


class MalformedRequestError(ValueError):
    """An edit request that cannot be applied; the message names the record and the field."""


@dataclass
class EditRequest:
    """One fact to write into the model.

    Args:
        prompt: the factual prompt with ``{}`` where the subject goes, e.g. ``"{} is located in"``.
        subject: the subject string inserted into ``prompt``.
        target_new: the new object the model should produce.
        target_true: the original object (CounterFact), used by magnitude/efficacy scores.
        paraphrase_prompts: full prompts (subject included) that should also yield ``target_new``.
        neighborhood_prompts: out-of-scope prompts whose predictions must not change.
        neighborhood_answers: the answer of each neighbourhood prompt (one per prompt, or one for all).
        generation_prompts: prompts about the subject that fluency samples from (CounterFact's).
        case_id: identifier in the source dataset, when it has one.
        source: the file (or hub dataset) the record came from.
        source_index: row of the record in its source.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_answers: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    case_id: int | str | None = None
    source: str | None = None
    source_index: int | None = None

    @property
    def name(self) -> str:
        """How error messages name this record."""
        where = f"{self.source}" if self.source else "request"
        parts = []
        if self.source_index is not None:
            parts.append(f"row {self.source_index}")
        if self.case_id is not None:
            parts.append(f"case_id {self.case_id}")
        return f"{where} ({', '.join(parts)})" if parts else where

    @property
    def prompt_text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def neighborhood_pairs(self) -> list[tuple[str, str]]:
        """(prompt, answer) pairs of the out-of-scope prompts."""
        answers = self.neighborhood_answers
        if len(answers) == 1 and len(self.neighborhood_prompts) > 1:
            answers = answers * len(self.neighborhood_prompts)
        return list(zip(self.neighborhood_prompts, answers))

    def validate(self, tokenizer: Any | None = None) -> "EditRequest":
        """Raise :class:`MalformedRequestError` unless the record can be edited; return it otherwise."""

        def fail(field_name: str, why: str) -> None:
            raise MalformedRequestError(f"{self.name}: field '{field_name}' {why}")

        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                fail(name, f"must be a non-empty string, got {_short(value)}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            fail("target_true", f"must be a string, got {_short(self.target_true)}")
        for name in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers"):
            for i, v in enumerate(getattr(self, name)):
                if not isinstance(v, str):
                    fail(f"{name}[{i}]", f"must be a string, got {_short(v)}")
        if self.case_id is not None and (isinstance(self.case_id, bool) or not isinstance(self.case_id, (int, str))):
            fail("case_id", f"must be an integer or a string, got {_short(self.case_id)}")
        for name, value in self._texts():
            if len(value) > MAX_FIELD_CHARS:
                fail(name, f"has {len(value)} characters, more than the {MAX_FIELD_CHARS} a record field may have")
        if self.prompt.count("{}") != 1:
            fail("prompt", f"must contain exactly one '{{}}' placeholder for the subject, got {self.prompt!r}")
        if self.prompt.strip().endswith("{}"):
            fail("prompt", "ends with the subject; the fact needs a relation after it")
        if self.neighborhood_answers and len(self.neighborhood_answers) not in (1, len(self.neighborhood_prompts)):
            fail(
                "neighborhood_answers",
                f"has {len(self.neighborhood_answers)} answers for {len(self.neighborhood_prompts)} prompts",
            )
        for i, p in enumerate(self.paraphrase_prompts):
            if not isinstance(p, str) or not p.strip():
                fail(f"paraphrase_prompts[{i}]", "is empty")
        if tokenizer is not None:
            if not tokenizer(" " + self.target_new.strip(), add_special_tokens=False)["input_ids"]:
                fail("target_new", f"{self.target_new!r} tokenises to nothing")
            if not tokenizer(self.subject, add_special_tokens=False)["input_ids"]:
                fail("subject", f"{self.subject!r} tokenises to nothing")
        return self

    def _texts(self) -> list[tuple[str, str]]:
        out = [(n, getattr(self, n)) for n in ("prompt", "subject", "target_new", "target_true")]
        for name in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers"):
            out += [(f"{name}[{i}]", v) for i, v in enumerate(getattr(self, name))]
        return [(n, v) for n, v in out if isinstance(v, str)]

    def check_fits(self, tokenizer: Any, max_tokens: int | None, template: str = "{}") -> "EditRequest":
        """Raise :class:`MalformedRequestError` unless every text the edit and its evaluation feed the model fits
        in ``max_tokens``: the prompt after the longest context ``template`` with the new target, each paraphrase
        with it, each neighbourhood prompt with its answer, the prompt with the true target."""
        if max_tokens is None:
            return self

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        texts = [("prompt", template.replace("{}", self.prompt_text) + " " + self.target_new)]
        if self.target_true:
            texts.append(("target_true", self.prompt_text + " " + self.target_true))
        texts += [(f"paraphrase_prompts[{i}]", p + " " + self.target_new) for i, p in enumerate(self.paraphrase_prompts)]
        texts += [(f"neighborhood_prompts[{i}]", p + " " + a) for i, (p, a) in enumerate(self.neighborhood_pairs())]
        for name, text in texts:
            n = count(text)
            if n > max_tokens:
                raise MalformedRequestError(
                    f"{self.name}: field '{name}' needs {n} tokens (with its target and the longest context "
                    f"template), more than the model's context of {max_tokens}"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditRequest":
        return cls(**d)


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def validate_requests(requests: list[EditRequest], tokenizer: Any | None = None) -> list[EditRequest]:
    """Validate every request of a batch before any of them is applied."""
    for r in requests:
        r.validate(tokenizer)
    return requests
