"""Callbacks of an editing run: the weight write, the edit ledger, norm tracking, evaluation and plots.

Order matters and is the order :func:`default_callbacks` returns: the write happens first in
``on_train_batch_end``, then the ledger and the norms see the new weights, then evaluation; Lightning runs
``ModelCheckpoint`` after all of them, so a checkpoint always holds a completed edit.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from eac_lightning.evaluation.evaluator import Evaluator, format_table, summary_sections
from eac_lightning.models.adapters import weight_view


def _log_dir(trainer: L.Trainer) -> Path:
    # Not ``trainer.log_dir``: it broadcasts, and these writers run on rank 0 alone.
    logger_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
    d = Path(logger_dir or trainer.default_root_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d


class WeightUpdate(L.Callback):
    """Applies the closed-form update of the step's targets (ROME rank-one, MEMIT/AlphaEdit multi-layer, FT's
    delta) and records it. Under DDP every rank computes the same edit; rank 0's weights are then broadcast so
    the ranks stay identical whatever their floating-point paths."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        deltas = pl_module.write_pending()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            for name in pl_module.total_deltas:
                dist.broadcast(pl_module.total_deltas[name], src=0)
            pl_module.materialise()
        pl_module.last_deltas = deltas
        trainer.datamodule.position += len(batch)
        seconds = time.perf_counter() - pl_module.step_started
        pl_module.log("seconds_per_edit", seconds / len(batch), prog_bar=True, logger=False)
        pl_module.log("edits", float(trainer.datamodule.position), prog_bar=True, logger=False)
        pl_module.last_seconds = seconds


class EditLedger(L.Callback):
    """``edits.jsonl``: one line per applied edit (step, source row, case id, subject, prompt, target, seconds,
    norm of its delta). On resume, lines past the checkpoint are dropped so no edit appears twice."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.path = _log_dir(trainer) / "edits.jsonl"
        if trainer.global_rank != 0:
            return
        keep = []
        if self.path.exists():
            applied = trainer.datamodule.position
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip() and json.loads(line)["edit"] < applied:
                    keep.append(line)
        self.path.write_text("".join(l + "\n" for l in keep), encoding="utf-8")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != 0:
            return
        first = trainer.datamodule.position - len(batch)
        norm = math.sqrt(sum(float(d.float().pow(2).sum()) for d in pl_module.last_deltas.values()))
        with open(self.path, "a", encoding="utf-8") as fh:
            for i, r in enumerate(batch):
                fh.write(json.dumps({
                    "step": trainer.global_step, "edit": first + i, "source": r.source,
                    "source_index": r.source_index, "case_id": r.case_id, "subject": r.subject,
                    "prompt": r.prompt, "target_new": r.target_new,
                    "seconds": round(pl_module.last_seconds / len(batch), 4), "delta_norm": norm,
                }, ensure_ascii=False) + "\n")


def matrix_norms(w: torch.Tensor, w0: torch.Tensor, condition: bool) -> dict[str, float]:
    """L1 and Frobenius norms of W, their change relative to W₀ (EAC Fig. 2a), and optionally cond(W)."""
    w, w0 = w.double(), w0.double()
    out = {
        "l1": float(w.abs().sum()), "l1_before": float(w0.abs().sum()),
        "fro": float(w.norm()), "fro_before": float(w0.norm()),
    }
    out["l1_rel_change"] = (out["l1"] - out["l1_before"]) / out["l1_before"]
    out["fro_rel_change"] = (out["fro"] - out["fro_before"]) / out["fro_before"]
    out["fro_dist_rel"] = float((w - w0).norm() / w0.norm())
    if condition:
        s = torch.linalg.svdvals(w)
        out["cond"] = float(s[0] / s[-1])
    return out


class NormTracker(L.Callback):
    """Every ``every`` edit steps, the norms of each edited matrix against the unedited one, in ``norms.csv``.

    Args:
        every: cadence in edit steps.
        condition_number: also compute cond(W) (an SVD; affordable for small matrices only).
    """

    def __init__(self, every: int = 1, condition_number: bool = False) -> None:
        self.every, self.condition_number = every, condition_number

    def current(self, pl_module) -> dict[str, dict[str, float]]:
        return {
            name: matrix_norms(weight_view(pl_module.lm, name), w0, self.condition_number)
            for name, w0 in pl_module.base_weights.items()
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != 0 or trainer.global_step % self.every:
            return
        path = _log_dir(trainer) / "norms.csv"
        edits = trainer.datamodule.position
        rows = pl_module.extra_state.setdefault("norms", [])
        for name, n in self.current(pl_module).items():
            rows.append({"edits": edits, "module": name, **n})
        keys = list(rows[0])
        path.write_text(
            ",".join(keys) + "\n" + "".join(",".join(str(r.get(k, "")) for k in keys) + "\n" for r in rows),
            encoding="utf-8",
        )


class Evaluation(L.Callback):
    """Edit metrics over every edit applied so far, general-ability tasks and probes: before the first edit,
    every ``every`` edits and at the end; sharded across ranks (torchmetrics reduces). Writes ``metrics.csv``
    rows through the logger, and ``summary.json`` at the end of fit and of ``validate``.

    Args:
        every: cadence in edits (0: only before and at the end).
    """

    def __init__(self, every: int = 25) -> None:
        self.every = every

    def _evaluator(self, trainer, pl_module) -> Evaluator:
        return Evaluator(pl_module.evaluation, trainer.global_rank, trainer.world_size)

    def _run(self, trainer, pl_module) -> dict[str, float]:
        dm = trainer.datamodule
        ev = self._evaluator(trainer, pl_module)
        was = pl_module.lm.training
        pl_module.lm.eval()
        with torch.no_grad():
            res = ev.evaluate(pl_module.lm, pl_module.tokenizer, dm.applied(), pl_module.extra_state.get("reference"),
                              retention_requests=dm.retention)
        pl_module.lm.train(was)
        return res

    def _record(self, trainer, pl_module, res: dict[str, float]) -> None:
        edits = trainer.datamodule.position
        pl_module.extra_state.setdefault("evaluations", []).append({"edits": edits, **res})
        if trainer.logger is not None:
            trainer.logger.log_metrics({"edits": edits, **res}, step=trainer.global_step)
            trainer.logger.save()

    def on_train_start(self, trainer, pl_module) -> None:
        st = pl_module.extra_state
        if "reference" not in st:  # a fresh run: measure the unedited model once
            ev = self._evaluator(trainer, pl_module)
            st["reference"] = ev.reference(pl_module.lm, pl_module.tokenizer, trainer.datamodule.requests)
            st["before"] = self._run(trainer, pl_module)
            self._record(trainer, pl_module, st["before"])
        st.setdefault("started", time.time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        edits = trainer.datamodule.position
        if self.every and edits % self.every < len(batch) and edits < len(trainer.datamodule.requests):
            self._record(trainer, pl_module, self._run(trainer, pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        res = self._run(trainer, pl_module)
        self._record(trainer, pl_module, res)
        self._summary(trainer, pl_module, res)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "validate":
            return
        st = pl_module.extra_state
        if "reference" not in st:
            st["reference"] = None
        res = self._run(trainer, pl_module)
        if trainer.global_rank == 0:
            print(format_table(res, st.get("before")))
        self._summary(trainer, pl_module, res)

    def _summary(self, trainer, pl_module, res: dict[str, float]) -> None:
        if trainer.global_rank != 0:
            return
        st = pl_module.extra_state
        sections = summary_sections(res, st.get("before"))
        ledger = _log_dir(trainer) / "edits.jsonl"
        seconds = [json.loads(l)["seconds"] for l in ledger.read_text().splitlines()] if ledger.exists() else []
        norms = {}
        for name, w0 in pl_module.base_weights.items():
            n = matrix_norms(weight_view(pl_module.lm, name), w0, False)
            norms[name] = {k: n[k] for k in ("l1_before", "l1", "l1_rel_change", "fro_rel_change")}
            norms[name]["l1_after"] = norms[name].pop("l1")
        summary = {
            "method": pl_module.method.label,
            "model": pl_module.model_name,
            "edits_applied": trainer.datamodule.position,
            "batch_size": trainer.datamodule.batch_size,
            "edit_metrics": sections["edit_metrics"],
            "edit_metrics_variants": sections["edit_metrics_variants"],  # *_gen, rome_*, literature metrics
            "general": sections["general"],
            "norms": norms,
            "seconds_per_edit": (sum(seconds) / len(seconds)) if seconds else None,
            "wall_seconds": time.time() - st.get("started", time.time()),
        }
        (_log_dir(trainer) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


class Plots(L.Callback):
    """PNG plots in ``plots/`` at the end of fit: relative L1 change of each edited matrix and the evaluation
    metrics against the number of edits."""

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = _log_dir(trainer) / "plots"
        out.mkdir(exist_ok=True)
        rows = pl_module.extra_state.get("norms", [])
        if rows:
            fig, ax = plt.subplots(figsize=(6, 4))
            for name in sorted({r["module"] for r in rows}):
                pts = [(r["edits"], 100 * r["l1_rel_change"]) for r in rows if r["module"] == name]
                ax.plot(*zip(*pts), label=name)
            ax.set(xlabel="edits", ylabel="L1 norm change (%)", title="Edited-matrix deviation (EAC Fig. 2a)")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / "norms.png", dpi=120)
            plt.close(fig)
        evals = pl_module.extra_state.get("evaluations", [])
        if evals:
            keys = [k for k in evals[-1] if k.startswith(("edit/reliability", "edit/generalization", "edit/locality",
                                                          "general/")) and not k.endswith("ppl")]
            fig, ax = plt.subplots(figsize=(6, 4))
            for k in keys:
                pts = [(e["edits"], e[k]) for e in evals if k in e]
                ax.plot(*zip(*pts), marker="o", label=k)
            ax.set(xlabel="edits", ylabel="score", title="Metrics against edits")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / "metrics.png", dpi=120)
            plt.close(fig)
