"""Second-moment statistics of the keys of edited layers: C = E[k kᵀ] (ROME Eq. 2 / MEMIT Eq. 14).

Keys are the inputs of the MLP output projection over a text corpus. The corpus is loaded with ``datasets``
(local text/JSON files, or a hub dataset name), tokenised, packed into fixed-length windows and streamed in
batches with a tqdm progress bar showing tokens/s, on the model's device. Results are cached on disk under a key of
(model fingerprint, module, corpus, token count, dtype), the count being the tokens really averaged (a shorter
corpus is warned about); partial sums are saved periodically and on an interrupt so an interrupted run resumes
where it stopped. Published ROME/MEMIT statistics (``mom2`` ``.npz``) can be imported instead
(:meth:`CovarianceStore.import_mom2`).

Solves against C use a cached Cholesky factorisation of the damped matrix
``C + ε·(tr C / d)·I`` (ε = ``damping``): a small corpus leaves C ill-conditioned (eigenvalues spanning nine
orders of magnitude were measured on a small model), and an undamped C⁻¹ then blows edits up.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from eac_lightning.models.adapters import key_dim
from eac_lightning.models.loading import default_stats_corpus
from eac_lightning.models.tracing import capture
from eac_lightning.paths import cache_dir, resolve_data_path, writable_cache_folder
from eac_lightning.progress import phase, progress

DEFAULT_CORPUS = "wikitext"  # resolves to the shipped assets/data/wikitext


def stats_cache_key(model: nn.Module) -> str:
    """A short hash of the model's config and weights (names, shapes and a sample of values): the key statistics
    cached for one model are not used for another. (A run's base-model identity is
    :func:`eac_lightning.lightning.checkpoint.model_fingerprint`.)"""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    h.update((cfg.to_json_string(use_diff=False) if cfg is not None else type(model).__name__).encode())
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        if p.device.type == "meta":  # offloaded to disk by a device map: its name and shape stand for it
            continue
        flat = p.detach().reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def iter_corpus_texts(corpus: str, split: str = "train") -> Iterator[str]:
    """Texts of a corpus: a local text/JSON(L) file or folder, or a hub dataset name (``name`` or ``name:config``)."""
    import datasets

    path = resolve_data_path(corpus)
    if path.exists():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".json", ".jsonl")) if path.is_dir() else [path]
        txt = [str(p) for p in files if p.suffix == ".txt"]
        js = [str(p) for p in files if p.suffix != ".txt"]
        parts = []
        if txt:
            parts.append(datasets.load_dataset("text", data_files=txt, split="train"))
        if js:
            parts.append(datasets.load_dataset("json", data_files=js, split="train"))
    else:
        name, _, config = corpus.partition(":")
        parts = [datasets.load_dataset(name, config or None, split=split)]
    for ds in parts:
        for rec in ds:
            text = rec.get("text")
            if text and text.strip():
                yield text


def _token_windows(tokenizer, corpus: str, seq_len: int) -> Iterator[torch.Tensor]:
    from eac_lightning.models.encoding import encode_long

    buf: list[int] = []
    for text in iter_corpus_texts(corpus):
        buf.extend(encode_long(tokenizer, [text])[0])  # split into windows below: never fed whole to the model
        while len(buf) >= seq_len:
            yield torch.tensor(buf[:seq_len])
            buf = buf[seq_len:]


@dataclass
class Covariance:
    """C = E[k kᵀ] of one module's keys, with a cached factorisation of its damped form."""

    matrix: torch.Tensor  # float64 (d, d)
    count: int
    damping: float

    def __post_init__(self) -> None:
        self._chol: torch.Tensor | None = None

    @property
    def damped(self) -> torch.Tensor:
        d = self.matrix.shape[0]
        scale = torch.trace(self.matrix) / d
        return self.matrix + self.damping * scale * torch.eye(d, dtype=self.matrix.dtype, device=self.matrix.device)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """(C + εI)⁻¹ rhs in float64 through the cached Cholesky factor (rhs: (d,) or (d, n)), on rhs's device
        (C lives on the CPU; the factor moves once to the device the keys are on)."""
        b = rhs.to(dtype=self.matrix.dtype)
        if self._chol is None:
            self._chol = torch.linalg.cholesky(self.damped.to(b.device))
        elif self._chol.device != b.device:
            self._chol = self._chol.to(b.device)
        return torch.cholesky_solve(b[:, None] if b.dim() == 1 else b, self._chol).reshape(b.shape)


class CovarianceStore:
    """Computes, caches (memory and disk) and serves :class:`Covariance` objects per module.

    Args:
        model: the unedited model (its fingerprint keys the disk cache).
        tokenizer: its tokenizer.
        corpus: text corpus (local path or hub name); default: the file named by the model folder's editing
            defaults (:data:`~eac_lightning.models.loading.EDITING_DEFAULTS`, e.g. a sample of the model's own
            training stream), else the shipped ``wikitext``.
        num_tokens: how many tokens of the corpus to average over.
        seq_len: window length fed to the model.
        batch_size: windows per forward pass.
        dtype: the dtype of the accumulated statistics on disk.
        damping: ε of the damped solve (relative to the mean eigenvalue tr(C)/d).
        directory: cache folder (default ``<cache_dir>/stats``).
        rank, world_size, all_reduce: several processes share one pass (``eac-lightning stats --devices N``):
            process ``rank`` reads every ``world_size``-th window of the corpus and ``all_reduce`` (an in-place
            sum over the processes, e.g. Fabric's) adds the float64 sums and counts; rank 0 writes the cache.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        corpus: str | None = None,
        num_tokens: int = 100_000,
        seq_len: int = 128,
        batch_size: int = 16,
        dtype: torch.dtype = torch.float64,
        damping: float = 1e-2,
        directory: str | os.PathLike | None = None,
        rank: int = 0,
        world_size: int = 1,
        all_reduce=None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        if corpus is None:
            corpus = default_stats_corpus(model, DEFAULT_CORPUS)
        self.corpus, self.num_tokens, self.seq_len, self.batch_size = corpus, num_tokens, seq_len, batch_size
        self.dtype, self.damping = dtype, damping
        if directory:
            self.directory = Path(directory)
            self.directory.mkdir(parents=True, exist_ok=True)
        else:  # an unwritable default names the folder and EAC_CACHE_DIR
            self.directory = writable_cache_folder(cache_dir() / "stats")
        self.fingerprint = stats_cache_key(model)
        self._memory: dict[str, Covariance] = {}
        self.rank, self.world_size, self.all_reduce = rank, world_size, all_reduce

    def path(self, module_name: str, num_tokens: int | None = None) -> Path:
        """The cache file of ``module_name``'s statistics over ``num_tokens`` tokens (default: the requested)."""
        corpus_tag = hashlib.sha256(str(self.corpus).encode()).hexdigest()[:8]
        tokens = self.num_tokens if num_tokens is None else num_tokens
        key = f"{self.fingerprint}-{module_name}-{corpus_tag}-{tokens}-{str(self.dtype).split('.')[-1]}"
        return self.directory / f"{key}.pt"

    def _short_marker(self, module_name: str) -> Path:
        """Where a corpus shorter than the requested count records how many tokens it really held."""
        return self.path(module_name).with_suffix(".short")

    def get(self, module_name: str) -> Covariance:
        """The covariance of ``module_name``'s keys, computed on first use."""
        if module_name not in self._memory:
            self.prefetch([module_name])
        return self._memory[module_name]

    def prefetch(self, module_names: Sequence[str]) -> None:
        """Load or compute several modules' statistics in one pass over the corpus (a run's "statistics" time,
        :data:`~eac_lightning.progress.PHASES`)."""
        with phase("statistics"):
            self._prefetch(module_names)

    def _prefetch(self, module_names: Sequence[str]) -> None:
        missing = []
        for n in module_names:
            if n in self._memory:
                continue
            p = self.path(n)
            marker = self._short_marker(n)
            if not p.exists() and marker.exists():  # the corpus ran out before: its statistics are keyed by what it held
                p = self.path(n, int(marker.read_text()))
                _warn_short(self.corpus, int(marker.read_text()), self.num_tokens)
            if p.exists():
                try:
                    data = torch.load(p, map_location="cpu", weights_only=True)
                except Exception as err:
                    raise RuntimeError(f"covariance cache {p} is corrupt ({err}); delete it to recompute") from err
                self._memory[n] = Covariance(data["mom2"].double() / data["count"], int(data["count"]), self.damping)
            else:
                missing.append(n)
        if missing:
            self._compute(missing)

    def _compute(self, names: list[str]) -> None:
        """One pass over the corpus for ``names``: exactly ``num_tokens`` keys (the last window is cut), sums
        accumulated on the model's device, partial sums saved every 30 s and on an interrupt (Ctrl-C, SIGTERM)
        so that a rerun resumes where this one stopped."""
        group = hashlib.sha256("|".join([*names, str(self.corpus)]).encode()).hexdigest()[:8]
        shard = f"-r{self.rank}of{self.world_size}" if self.world_size > 1 else ""
        partial = self.directory / f"{self.fingerprint}-{group}-{self.num_tokens}{shard}.partial.pt"
        state = {"sums": {}, "count": 0, "windows": 0}
        if partial.exists():
            try:
                state = torch.load(partial, map_location="cpu", weights_only=True)
            except Exception:
                partial.unlink()  # an interrupted write of the partial file: start over
        device = next(self.model.parameters()).device
        state["sums"] = {n: s.to(device) for n, s in state["sums"].items()}
        # Window i of the corpus holds tokens [i·seq_len, (i+1)·seq_len) of the num_tokens; this process reads the
        # windows i ≡ rank (mod world_size), and the last one needed is cut at num_tokens.
        needed = -(-self.num_tokens // self.seq_len)
        mine = [i for i in range(needed) if i % self.world_size == self.rank]
        tokens_of = {i: min(self.seq_len, self.num_tokens - i * self.seq_len) for i in mine}
        goal = sum(tokens_of.values())
        windows = (w for i, w in enumerate(_token_windows(self.tokenizer, self.corpus, self.seq_len))
                   if i % self.world_size == self.rank)
        for _ in range(state["windows"]):  # skip what the partial sums already hold
            next(windows, None)
        bar = progress(total=goal, initial=state["count"], desc=f"key covariance ({len(names)} layers)",
                       unit="tok", unit_scale=True, disable=self.rank != 0)
        t0, tokens0, last_save = time.time(), state["count"], time.time()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), capture(self.model, names) as rec, _sigterm_as_interrupt():
                while state["windows"] < len(mine):
                    wanted = len(mine) - state["windows"]  # this process's windows still needed
                    batch = [w for _, w in zip(range(min(self.batch_size, wanted)), windows)]
                    if not batch:
                        break
                    self.model(input_ids=torch.stack(batch).to(device), use_cache=False)
                    take = sum(tokens_of[i] for i in mine[state["windows"]:state["windows"] + len(batch)])
                    for n in names:
                        k = rec[n].input.reshape(-1, rec[n].input.shape[-1])[:take].to(self.dtype)
                        state["sums"][n] = state["sums"][n] + k.T @ k if n in state["sums"] else k.T @ k
                    state["count"] += take
                    state["windows"] += len(batch)
                    bar.update(take)
                    bar.set_postfix(tok_s=f"{(state['count'] - tokens0) / max(time.time() - t0, 1e-9):.0f}")
                    if time.time() - last_save > 30:
                        _atomic_save(_on_cpu(state), partial)
                        last_save = time.time()
        except BaseException:
            if state["count"] > tokens0:
                _atomic_save(_on_cpu(state), partial)
            raise
        finally:
            bar.close()
            self.model.train(was_training)
        if self.all_reduce is not None:  # the processes' float64 sums and counts added
            total = torch.tensor([float(state["count"])], dtype=torch.float64, device=device)
            self.all_reduce(total)
            for n in names:
                if n not in state["sums"]:
                    d = key_dim(self.model, n)
                    state["sums"][n] = torch.zeros(d, d, dtype=self.dtype, device=device)
                self.all_reduce(state["sums"][n])
            state["count"] = int(total.item())
        count = state["count"]
        if count == 0:
            raise RuntimeError(f"corpus {self.corpus!r} yielded no {self.seq_len}-token window")
        if count < self.num_tokens:
            _warn_short(self.corpus, count, self.num_tokens)
        for n in names:
            if self.rank == 0:
                _atomic_save({"mom2": state["sums"][n].cpu(), "count": count}, self.path(n, count))
                if count < self.num_tokens:
                    self._short_marker(n).write_text(str(count))
            self._memory[n] = Covariance(state["sums"][n].cpu().double() / count, count, self.damping)
        partial.unlink(missing_ok=True)

    def export_mom2(self, module_name: str, npz_path: str | os.PathLike, sample_size: int = 100_000) -> Path:
        """Write ``module_name``'s statistics as a ROME/MEMIT ``layer_stats`` ``.npz`` (``mom2.mom2``: the (d, d)
        sum Σ k kᵀ in float64, ``mom2.count``), the format :meth:`import_mom2` reads, so a lab computes them once
        and shares the file.

        ``sample_size`` is recorded as the file's ``sample_size``: the published readers (ROME's, MEMIT's and
        EasyEdit's ``runningstats.load_cached_state``) compare it with their ``mom2_n_samples`` (100,000 in every
        published hyper-parameter file) and fail on a file without it; they find the file as
        ``<stats_dir>/<model>/<dataset>_stats/<module>_float32_mom2_<sample_size>.npz``."""
        import numpy as np

        cov = self.get(module_name)
        path = Path(npz_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            np.savez(fh, **{"mom2.mom2": (cov.matrix * cov.count).numpy(), "mom2.count": np.array(cov.count),
                            "sample_size": np.array(sample_size)})
        return path

    def import_mom2(self, module_name: str, npz_path: str | os.PathLike) -> Covariance:
        """Use published key statistics for ``module_name``: a ROME/MEMIT ``layer_stats`` ``.npz`` holding
        ``mom2.mom2`` (the (d, d) sum Σ k kᵀ) and ``mom2.count`` (the number of keys), as the ROME, MEMIT and
        EasyEdit releases ship them. Stored in this store's cache (under its corpus and token count, so a run
        configured the same way finds it) and returned."""
        import numpy as np

        with np.load(npz_path, allow_pickle=False) as data:
            missing = {"mom2.mom2", "mom2.count"} - set(data.files)
            if missing:
                raise ValueError(f"{npz_path} is not a ROME/MEMIT mom2 file: it lacks {sorted(missing)} "
                                 f"(it holds {sorted(data.files)})")
            mom2, count = torch.from_numpy(data["mom2.mom2"]), int(data["mom2.count"])
        d = key_dim(self.model, module_name)
        if mom2.shape != (d, d) or count <= 0:
            raise ValueError(f"{npz_path}: mom2 of shape {tuple(mom2.shape)} with count {count} does not fit "
                             f"{module_name}, whose keys have dimension {d}")
        _atomic_save({"mom2": mom2.to(self.dtype), "count": count}, self.path(module_name))
        self._memory[module_name] = Covariance(mom2.double() / count, count, self.damping)
        return self._memory[module_name]


def convergence_report(model: nn.Module, tokenizer, names: Sequence[str], corpus: str, num_tokens: int,
                       seq_len: int = 128, batch_size: int = 16, damping: float = 1e-2,
                       fractions: Sequence[float] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2),
                       holdout_windows: int = 16) -> dict[str, list[dict[str, float]]]:
    """How much the solve C⁻¹k that every edit uses still moves as tokens are added: for C over each fraction of
    ``num_tokens``, the relative change ‖C_t⁻¹K − C_N⁻¹K‖_F / ‖C_N⁻¹K‖_F on held-out keys K (the
    ``holdout_windows`` windows that follow the ``num_tokens``), damped as the runs solve. Returns {module: [{"tokens",
    "relative_change"}, ...]}. One pass over the corpus (it keeps a copy of the sums per fraction: d_k² floats
    each)."""
    marks = sorted({max(1, int(f * num_tokens)) for f in fractions} | {num_tokens})
    sums: dict[str, torch.Tensor] = {}
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    held: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    count, device = 0, next(model.parameters()).device
    windows = _token_windows(tokenizer, corpus, seq_len)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture(model, names) as rec:
            spare = 0
            while spare < holdout_windows:
                batch = [w for _, w in zip(range(batch_size), windows)]
                if not batch:
                    break
                model(input_ids=torch.stack(batch).to(device), use_cache=False)
                keys = {n: rec[n].input.reshape(-1, rec[n].input.shape[-1]).double().cpu() for n in names}
                for row in range(0, len(batch) * seq_len, seq_len):  # window by window: milestones fall inside
                    if count >= num_tokens:
                        for n in names:
                            held[n].append(keys[n][row:row + seq_len])
                        spare += 1
                        continue
                    pos = 0
                    while pos < seq_len and count < num_tokens:
                        take = min(seq_len - pos, min(m for m in marks if m > count) - count)
                        for n in names:
                            k = keys[n][row + pos:row + pos + take]
                            sums[n] = sums[n] + k.T @ k if n in sums else k.T @ k
                        count, pos = count + take, pos + take
                        if count in marks:
                            snaps[count] = {n: sums[n].clone() for n in names}
    finally:
        model.train(was_training)
    if count < num_tokens or not any(held.values()):
        raise ValueError(f"corpus {corpus!r} holds fewer than {num_tokens} tokens plus {holdout_windows} held-out "
                         f"windows of {seq_len}: lower --num_tokens for the convergence report")
    out: dict[str, list[dict[str, float]]] = {}
    for n in names:
        keys = torch.cat(held[n]).T  # (d_k, m)
        final = Covariance(snaps[num_tokens][n] / num_tokens, num_tokens, damping).solve(keys)
        out[n] = [{"tokens": t, "relative_change": float((Covariance(snaps[t][n] / t, t, damping).solve(keys) - final)
                                                         .norm() / final.norm())} for t in marks if t < num_tokens]
    return out


def _on_cpu(state: dict) -> dict:
    return {**state, "sums": {n: s.cpu() for n, s in state["sums"].items()}}


def _warn_short(corpus: str, seen: int, requested: int) -> None:
    warnings.warn(f"corpus {corpus!r} holds only {seen} tokens in full windows, fewer than the {requested} "
                  f"requested: the key statistics average over {seen} (cached under that count)", stacklevel=3)


@contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM (a scheduler's kill) into KeyboardInterrupt inside the block, so the partial sums are saved
    as on Ctrl-C. Only the main thread may set signal handlers; elsewhere SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _atomic_save(obj, path: Path) -> None:
    # The cache is shared by every run on the machine: two runs computing one matrix each write a file of their
    # own and the last rename wins (both hold the same statistics); one fixed temporary name was renamed away
    # under the other writer.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
