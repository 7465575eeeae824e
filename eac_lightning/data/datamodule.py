"""The edit stream as a LightningDataModule: requests loaded with ``datasets``, seeded order, resumable.

Each batch is a list of :class:`EditRequest` (``batch_size`` 1 = single-sequential editing). The stream
position (edits consumed) is part of the datamodule's state, which Lightning stores in every checkpoint, so a
resumed run continues with the next edit. Every rank sees the same stream: edits are not sharded.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from eac_lightning.data.requests import EditRequest, MalformedRequestError
from eac_lightning.data.insertions import insertion_requests
from eac_lightning.data.sources import iter_records, load_requests, source_sha256
from eac_lightning.validation import check


class _EditStream(IterableDataset):
    def __init__(self, dm: "EditDataModule") -> None:
        self.dm = dm

    def __iter__(self) -> Iterator[list[EditRequest]]:
        dm = self.dm
        reqs = dm.requests
        for start in range(dm.position, len(reqs), dm.batch_size):
            yield reqs[start : start + dm.batch_size]

    def __len__(self) -> int:
        # The stream's batches, applied ones included: the progress bar's total and ETA. Lightning counts a resumed
        # epoch's batches from its checkpoint, so the length must not shrink as the position advances.
        return -(-len(self.dm.requests) // self.dm.batch_size)


class EditDataModule(L.LightningDataModule):
    """Edit requests from CounterFact (ROME or flat EasyEdit format), ZsRE (MEND format) or your JSON/JSONL.

    Args:
        path: a file, a folder of .json/.jsonl files, or a hub dataset name.
        num_edits: how many requests of the (shuffled) stream to apply; None or -1: all.
        batch_size: requests per edit step (1: single-sequential; >1: batch-sequential).
        shuffle: shuffle the records (seeded) before taking ``num_edits``.
        seed: the shuffle's seed.
        split: split name when ``path`` is a hub dataset.
        num_retention: unedited records whose original objects probe fact retention during evaluation: those
            after the edited ones in the same order, or the first ones of ``retention_path``.
        retention_path: another edit dataset to draw the retention probes from (e.g. ZsRE when every
            CounterFact record is edited).
        skip_malformed: leave malformed records out (each named in a warning and listed in ``summary.json``)
            instead of failing on the first: records the loader cannot read and records that do not fit the
            model (:meth:`screen`).
        insertions: continue the stream, after the source's records, with this many edits of facts the model does
            not know: the records with invented subjects (:mod:`eac_lightning.data.insertions`), for streams longer
            than the data (AlphaEdit's 2,000 edits, 10,000). Needs ``retention_path``: an insertion's true object
            is no fact the model knows.
    """

    def __init__(
        self,
        path: str = "counterfact",
        num_edits: int | None = 100,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        split: str = "train",
        num_retention: int = 100,
        retention_path: str | None = None,
        skip_malformed: bool = False,
        insertions: int = 0,
    ) -> None:
        super().__init__()
        check("data.insertions", insertions, integer=True, nonnegative=True)
        if insertions and not retention_path:
            raise ValueError("data.insertions needs data.retention_path (e.g. zsre): the stream's own records "
                             "after the edited ones are insertions, whose true objects the model does not know")
        check("data.num_edits", num_edits, integer=True, low=-1)
        check("data.batch_size", batch_size, integer=True, positive=True)
        check("data.seed", seed, integer=True)
        check("data.num_retention", num_retention, integer=True, nonnegative=True)
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"data.path must name a file, folder or hub dataset, got {path!r}")
        num_edits = None if num_edits == -1 else num_edits
        self.path, self.num_edits, self.batch_size = path, num_edits, batch_size
        self.shuffle, self.seed, self.split, self.num_retention = shuffle, seed, split, num_retention
        self.retention_path, self.skip_malformed, self.insertions = retention_path, skip_malformed, insertions
        self.requests: list[EditRequest] = []
        self.retention: list[EditRequest] = []
        self.position = 0  # requests already applied
        self.skipped: list[dict[str, Any]] = []  # {"source", "row", "reason"} of every record left out
        self.ordered: list[EditRequest] = []  # every readable record, in stream order
        self.retention_pool: list[EditRequest] = []
        self.source_sha256 = ""
        self.screened = False
        self.dropped: list[list] = []

    def setup(self, stage: str | None = None) -> None:
        if self.ordered:
            return
        records = load_requests(self.path, split=self.split, skip_malformed=self.skip_malformed,
                                skipped=self.skipped)
        if not records:
            raise ValueError(f"data.path {self.path} holds no usable edit records")
        self.source_sha256 = source_sha256(self.path, self.split)
        order = list(range(len(records)))
        if self.shuffle:
            random.Random(self.seed).shuffle(order)
        self.ordered = [records[i] for i in order]
        if self.insertions:
            relations = {(src, row): (rec.get("requested_rewrite") or {}).get("relation_id")
                         for src, row, rec in iter_records(self.path, self.split) if isinstance(rec, dict)}
            self.ordered += insertion_requests(records, relations, self.insertions, seed=self.seed)
        if self.retention_path:
            self.retention_pool = load_requests(self.retention_path, split=self.split, limit=self.num_retention,
                                                skip_malformed=self.skip_malformed, skipped=self.skipped)
        self._select(self.ordered, self.retention_pool)

    def _select(self, ordered: list[EditRequest], retention_pool: list[EditRequest]) -> None:
        n = len(ordered) if self.num_edits is None else min(self.num_edits, len(ordered))
        self.requests = ordered[:n]
        pool = retention_pool if self.retention_path else ordered[n : n + self.num_retention]
        self.retention = [r for r in pool[: self.num_retention] if r.target_true]
        seen: dict[tuple, int] = {}
        for r in self.requests:
            if r.case_id is not None:
                seen[(r.source, r.case_id)] = seen.get((r.source, r.case_id), 0) + 1
        dup = [f"{src} case_id {cid} ({k} times)" for (src, cid), k in seen.items() if k > 1]
        if dup:
            warnings.warn(f"the edit stream holds duplicate case ids, each edited once per occurrence: "
                          f"{', '.join(dup[:10])}{' ...' if len(dup) > 10 else ''}", stacklevel=2)

    def screen(self, tokenizer: Any, max_tokens: int | None, template: str = "{}") -> None:
        """Check every record the run will use against the model before the first edit (validation with its
        tokenizer, length within its context after the longest context ``template``). A bad record raises
        naming its row, or with ``skip_malformed`` is left out and the next one takes its place."""
        if self.screened:
            return

        def keep(requests: list[EditRequest], wanted: int | None) -> list[EditRequest]:
            out = []
            for r in requests:
                if wanted is not None and len(out) >= wanted:
                    break
                try:
                    r.validate(tokenizer).check_fits(tokenizer, max_tokens, template)
                except MalformedRequestError as err:
                    if not self.skip_malformed:
                        raise
                    warnings.warn(f"skipped malformed record: {err}", stacklevel=2)
                    self.skipped.append({"source": r.source, "row": r.source_index, "reason": str(err)})
                    continue
                out.append(r)
            return out

        edits = None if self.num_edits is None else self.num_edits + (0 if self.retention_path else self.num_retention)
        ordered = keep(self.ordered, edits)
        pool = keep(self.retention_pool, self.num_retention) if self.retention_path else []
        self._select(ordered, pool)
        self.screened = True

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_EditStream(self), batch_size=None, collate_fn=lambda b: b, num_workers=0)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """An edit batch is text (a list of :class:`EditRequest`): nothing to move, so it is passed on as it is.
        Lightning's default copies every request (its dataclass branch), a copy per edit of the stream."""
        if isinstance(batch, list) and all(isinstance(r, EditRequest) for r in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self) -> DataLoader:
        # ``validate`` evaluates one model state: a single step.
        return DataLoader([0], batch_size=1)

    def applied(self) -> list[EditRequest]:
        return self.requests[: self.position]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "num_requests": len(self.requests), "dropped": self.dropped,
                "num_edits": self.num_edits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "num_edits" in state and state["num_edits"] != self.num_edits:
            # Lightning resumes the stream's one epoch where it stopped; a stream of another length is another run.
            was, now = state["num_edits"], self.num_edits
            raise ValueError(
                f"--data.num_edits {-1 if now is None else now} differs from the {-1 if was is None else was} this "
                f"run was started with; resume with --data.num_edits {-1 if was is None else was}, or start a new "
                "run (another --trainer.default_root_dir) for a longer stream; nothing was changed")
        self.position = int(state["position"])
        # Records a rollback dropped from the replay (``eac-lightning rollback --drop``), named by (source, row).
        self.dropped = [list(x) for x in state.get("dropped", [])]
        gone = {tuple(x) for x in self.dropped}
        self.requests = self.requests[: self.position] + [
            r for r in self.requests[self.position :] if (r.source, r.source_index) not in gone]
