"""The edit stream as a LightningDataModule: requests loaded with ``datasets``, seeded order, resumable.

Each batch is a list of :class:`EditRequest` (``batch_size`` 1 = single-sequential editing). The stream
position (edits consumed) is part of the datamodule's state, which Lightning stores in every checkpoint, so a
resumed run continues with the next edit. Every rank sees the same stream: edits are not sharded.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from eac_lightning.data.requests import EditRequest
from eac_lightning.data.sources import load_requests


class _EditStream(IterableDataset):
    def __init__(self, dm: "EditDataModule") -> None:
        self.dm = dm

    def __iter__(self) -> Iterator[list[EditRequest]]:
        dm = self.dm
        reqs = dm.requests
        for start in range(dm.position, len(reqs), dm.batch_size):
            yield reqs[start : start + dm.batch_size]

    def __len__(self) -> int:
        # The batches still to apply: the progress bar's total and ETA.
        return -(-(len(self.dm.requests) - self.dm.position) // self.dm.batch_size)


class EditDataModule(L.LightningDataModule):
    """Edit requests from CounterFact (ROME or flat EasyEdit format), ZsRE (MEND format) or your JSON/JSONL.

    Args:
        path: a file, a folder of .json/.jsonl files, or a hub dataset name.
        num_edits: how many requests of the (shuffled) stream to apply; None: all.
        batch_size: requests per edit step (1: single-sequential; >1: batch-sequential).
        shuffle: shuffle the records (seeded) before taking ``num_edits``.
        seed: the shuffle's seed.
        split: split name when ``path`` is a hub dataset.
        num_retention: unedited records whose original objects probe fact retention during evaluation: those
            after the edited ones in the same order, or the first ones of ``retention_path``.
        retention_path: another edit dataset to draw the retention probes from (e.g. ZsRE when every
            CounterFact record is edited).
        skip_malformed: leave malformed records out (each named in a warning) instead of failing on the first.
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
    ) -> None:
        super().__init__()
        self.path, self.num_edits, self.batch_size = path, num_edits, batch_size
        self.shuffle, self.seed, self.split, self.num_retention = shuffle, seed, split, num_retention
        self.retention_path, self.skip_malformed = retention_path, skip_malformed
        self.requests: list[EditRequest] = []
        self.retention: list[EditRequest] = []
        self.position = 0  # requests already applied

    def setup(self, stage: str | None = None) -> None:
        if self.requests:
            return
        records = load_requests(self.path, split=self.split, skip_malformed=self.skip_malformed)
        order = list(range(len(records)))
        if self.shuffle:
            random.Random(self.seed).shuffle(order)
        n = len(order) if self.num_edits is None else min(self.num_edits, len(order))
        self.requests = [records[i] for i in order[:n]]
        if self.retention_path:
            pool = load_requests(self.retention_path, split=self.split, limit=self.num_retention,
                                 skip_malformed=self.skip_malformed)
        else:
            pool = [records[i] for i in order[n : n + self.num_retention]]
        self.retention = [r for r in pool[: self.num_retention] if r.target_true]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_EditStream(self), batch_size=None, collate_fn=lambda b: b, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        # ``validate`` evaluates one model state: a single step.
        return DataLoader([0], batch_size=1)

    def applied(self) -> list[EditRequest]:
        return self.requests[: self.position]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "num_requests": len(self.requests)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
