"""Callbacks of an editing run: the weight write, the edit ledger, norm tracking, evaluation and plots.

Order holds by construction: :class:`WeightUpdate` writes the step's targets in ``on_train_batch_end`` and then
calls :meth:`EditObserver.on_edit_written` of every observer (ledger, norms, evaluation, and any user callback that
subclasses :class:`EditObserver`), so each of them sees the new weights wherever it stands in the trainer's callback
list; Lightning runs ``ModelCheckpoint`` after every other callback, so a checkpoint always holds a completed edit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

from eac_lightning.evaluation.evaluator import (
    Evaluator,
    EvaluatorConfig,
    format_table,
    summary_sections,
)
from eac_lightning.lightning.memory import release_freed_memory
from eac_lightning.lightning.run_folder import (
    RunCSVLogger,
    ledger_until,
    read_ledger,
    trim_metrics,
    write_lines,
)
from eac_lightning.methods.edit import EditResult, Targets, write_targets
from eac_lightning.models.adapters import weight_view
from eac_lightning.progress import PHASES, phase


def _log_dir(trainer: L.Trainer) -> Path:
    # The run folder whatever the logger (a logger's version_N folder would hide the run's files from a resume);
    # not ``trainer.log_dir``: it broadcasts, and these writers run on rank 0 alone.
    d = Path(trainer.default_root_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d


class EditObserver(L.Callback):
    """A callback that acts on every applied edit batch, called by :class:`WeightUpdate` right after the write."""

    def on_edit_written(self, trainer: L.Trainer, pl_module, result: EditResult, seconds: float) -> None:
        """The batch ``result`` (deltas, one record per edit) was just written, in ``seconds`` from the start of its
        optimisation; the datamodule's position already counts it."""


class WeightUpdate(L.Callback):
    """Writes the step's targets (``training_step``'s output) with the closed-form update of the method (ROME
    rank-one, MEMIT/AlphaEdit multi-layer, FT's delta), appends it to the edit log
    (:meth:`~eac_lightning.lightning.module.EditingModule.apply_written`), then calls every :class:`EditObserver`.
    Under DDP every rank computes the same edit and rank 0's stored update (the log entry's factors, not the
    matrices) is broadcast before it is added, so the ranks stay identical whatever their floating-point paths."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        targets: Targets = outputs["targets"]
        with phase("solve"), _forwards_as(pl_module.lm, "solve", "evaluation"):
            result = write_targets(pl_module.method, pl_module.lm, pl_module.tokenizer, targets,
                                   restore=pl_module.materialise)  # a failed write: W = W_base + D again, no copy
        trainer.datamodule.position += len(targets.requests)
        try:
            pl_module.apply_written(result, targets.requests)  # the edit log's entry; W = W_base + D
        except BaseException:
            trainer.datamodule.position -= len(targets.requests)
            raise
        seconds = targets.seconds
        pl_module.log("seconds_per_edit", seconds / len(targets.requests), prog_bar=True, logger=False)
        pl_module.log("edits", float(trainer.datamodule.position), prog_bar=True, logger=False)
        for callback in trainer.callbacks:
            if isinstance(callback, EditObserver):
                callback.on_edit_written(trainer, pl_module, result, seconds)
        release_freed_memory()  # what the step (and an evaluation after it) freed: resident memory stays flat


class _forwards_as:
    """Inside the block, a whole-model forward that starts while the clock is in phase ``inside`` counts as phase
    ``name``: the write's check of each edit (teacher-forced scoring, :func:`~eac_lightning.methods.edit.
    write_targets`) is evaluation, while its key forwards are already "keys" and the rest is the solve."""

    def __init__(self, model: torch.nn.Module, inside: str, name: str) -> None:
        self.model, self.inside, self.name, self.entered = model, inside, name, []

    def _pre(self, module, args) -> None:
        entering = PHASES.current == self.inside
        if entering:
            PHASES.enter(self.name)
        self.entered.append(entering)

    def _post(self, module, args, output) -> None:
        if self.entered and self.entered.pop():
            PHASES.exit()

    def __enter__(self):
        self.handles = [self.model.register_forward_pre_hook(self._pre),
                        self.model.register_forward_hook(self._post, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


class EditLedger(EditObserver):
    """``edits.jsonl``: one line per applied edit: step, position in the stream, source row, case id, subject,
    prompt, target, seconds, the norm of its own delta and of its batch's, and whether the edited model now
    predicts its target (teacher-forced, right after the write). An earlier edit the method wrote again with the
    batch (B-EAC's refresh) gets a line with ``"refreshed": true`` in place of ``edit``. On resume, lines past the
    checkpoint are dropped so no edit appears twice."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.path = _log_dir(trainer) / "edits.jsonl"
        if trainer.global_rank != 0:
            return
        # Lines past the checkpoint are dropped; events (a rollback) stay as history.
        write_lines(self.path, ledger_until(read_ledger(self.path), trainer.datamodule.position, trainer.global_step))

    def on_edit_written(self, trainer, pl_module, result: EditResult, seconds: float) -> None:
        if trainer.global_rank != 0:
            return
        n = sum(not rec.refreshed for rec in result.records)
        first = trainer.datamodule.position - n
        batch_norm = result.delta_norm
        with open(self.path, "a", encoding="utf-8") as fh:
            for i, rec in enumerate(result.records):
                r = rec.request
                # a refreshed earlier edit has no stream position of its own: "refreshed" instead of "edit"
                where = {"refreshed": True} if rec.refreshed else {"edit": first + i, "seconds": round(seconds / n, 4)}
                fh.write(json.dumps({
                    "step": trainer.global_step, **where, "source": r.source,
                    "source_index": r.source_index, "case_id": r.case_id, "subject": r.subject,
                    "prompt": r.prompt, "target_new": r.target_new,
                    "delta_norm": rec.delta_norm, "batch_delta_norm": batch_norm,
                    "success": rec.success, "target_accuracy": rec.target_accuracy,
                }, ensure_ascii=False) + "\n")


def matrix_norms(w: torch.Tensor, w0: torch.Tensor, condition: bool) -> dict[str, float]:
    """L1 and Frobenius norms of W, their change relative to W₀ (EAC Fig. 2a), the L1 norm of W − W₀, and
    optionally cond(W)."""
    w, w0 = w.double(), w0.double()
    out = {
        "l1": float(w.abs().sum()), "l1_before": float(w0.abs().sum()), "l1_dist": float((w - w0).abs().sum()),
        "fro": float(w.norm()), "fro_before": float(w0.norm()),
    }
    out["l1_rel_change"] = (out["l1"] - out["l1_before"]) / out["l1_before"]
    out["fro_rel_change"] = (out["fro"] - out["fro_before"]) / out["fro_before"]
    out["fro_dist_rel"] = float((w - w0).norm() / w0.norm())
    if condition:
        s = torch.linalg.svdvals(w)
        out["cond"] = float(s[0] / s[-1])
    return out


class NormTracker(EditObserver):
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

    def on_edit_written(self, trainer, pl_module, result: EditResult, seconds: float) -> None:
        if trainer.global_rank != 0 or trainer.global_step % self.every:
            return
        with phase("norms"):
            self._write_norms(trainer, pl_module)

    def _write_norms(self, trainer, pl_module) -> None:
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


class Evaluation(EditObserver):
    """Evaluation, every setting of it in the eval: section (--eval.*): when (every) and what is measured.

    ``every`` is the cadence; the other settings are the fields of
    :class:`~eac_lightning.evaluation.evaluator.EvaluatorConfig` (the edit metrics, teacher-forced and live-decoding,
    the general-ability tasks and probes, their limits).

    Edit metrics over every edit applied so far, general-ability tasks and probes: before the first edit, every
    ``every`` edits and at the end; sharded across ranks (torchmetrics reduces). Writes ``metrics.csv`` rows
    through the logger, and ``summary.json`` at the end of fit and of ``validate``.

    Args:
        every: cadence in edits (0: only before and at the end).
        **measure: what each evaluation measures, the fields of ``EvaluatorConfig`` (``tasks``, ``limits``,
            ``live_metrics``, ...), kept as :attr:`config`.
    """

    def __init__(self, every: int = 25, **measure) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"--eval.every must be an edit count >= 0, got {every!r}")
        self.every = every
        self.config = EvaluatorConfig(**measure)

    def _evaluator(self, trainer, pl_module) -> Evaluator:
        return Evaluator(self.config, trainer.global_rank, trainer.world_size)

    def _run(self, trainer, pl_module) -> dict[str, float]:
        with phase("evaluation"):
            try:
                return self._measure(trainer, pl_module)
            finally:
                release_freed_memory()  # an evaluation of every edit so far frees the most

    def _measure(self, trainer, pl_module) -> dict[str, float]:
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
        if trainer.global_rank == 0 and isinstance(trainer.logger, RunCSVLogger):
            # Rows logged after the checkpoint this run resumes from (all of them in a fresh run) are dropped.
            trim_metrics(Path(trainer.logger.log_dir) / "metrics.csv", trainer.global_step if "reference" in st else -1)
        if "reference" not in st:  # a fresh run: measure the unedited model once
            ev = self._evaluator(trainer, pl_module)
            with phase("evaluation"):
                st["reference"] = ev.reference(pl_module.lm, pl_module.tokenizer, trainer.datamodule.requests)
            st["before"] = self._run(trainer, pl_module)
            self._record(trainer, pl_module, st["before"])
        # Running time: this process's time from here on, added to the running time of the processes before it
        # (``run_seconds``, checkpointed), so the idle time between a stop and its resume is not counted. A
        # checkpoint from before ``run_seconds`` existed only has the first start: its processes count from there.
        now = time.time()
        self._process_started = now
        self._earlier_seconds = float(st.get("run_seconds", now - st.get("started", now)))
        st.setdefault("started", now)

    def _running_seconds(self, pl_module) -> float:
        """Seconds the run has been running (all its processes; the baseline evaluation of a fresh run excluded);
        outside fit, the running time recorded in the loaded checkpoint."""
        st = pl_module.extra_state
        if getattr(self, "_process_started", None) is None:
            return float(st.get("run_seconds", time.time() - st.get("started", time.time())))
        return self._earlier_seconds + time.time() - self._process_started

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Before the module's hook, which writes ``extra_state`` into the checkpoint.
        if getattr(self, "_process_started", None) is not None:
            pl_module.extra_state["run_seconds"] = self._running_seconds(pl_module)

    def on_edit_written(self, trainer, pl_module, result: EditResult, seconds: float) -> None:
        edits = trainer.datamodule.position
        new = sum(not rec.refreshed for rec in result.records)  # refreshed earlier edits move no stream position
        if self.every and edits % self.every < new and edits < len(trainer.datamodule.requests):
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
        seconds = [r["seconds"] for r in read_ledger(ledger) if "seconds" in r]
        norms = {}
        for name, w0 in pl_module.base_weights.items():
            n = matrix_norms(weight_view(pl_module.lm, name), w0, False)
            norms[name] = {k: n[k] for k in ("l1_before", "l1", "l1_rel_change", "fro_rel_change")}
            norms[name]["l1_after"] = norms[name].pop("l1")
        summary = {
            "method": pl_module.method.label,
            "method_settings": pl_module.method.method_settings or pl_module.method_settings,
            "model": pl_module.model_name,
            "edits_applied": trainer.datamodule.position,
            "batch_size": trainer.datamodule.batch_size,
            "edit_metrics": sections["edit_metrics"],
            "edit_metrics_variants": sections["edit_metrics_variants"],  # *_gen, rome_*, literature metrics
            "general": sections["general"],
            "norms": norms,
            "seconds_per_edit": (sum(seconds) / len(seconds)) if seconds else None,
            "wall_seconds": self._running_seconds(pl_module),  # not the pauses between a stop and its resume
            # where the time went (docs/real_width.md, "Where the time goes"): seconds per phase over the run, and
            # of the first edit step alone (it pays the one-off costs, e.g. the Cholesky factor of C)
            "phase_seconds": pl_module.phase_seconds(),
            "phase_seconds_first_step": st.get("phase_seconds_first_step"),
            "edit_steps": trainer.global_step,
            "skipped_records": list(getattr(trainer.datamodule, "skipped", [])),
        }
        (_log_dir(trainer) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _distinct_colours(n: int) -> list:
    """n colours, none repeated (tab10 up to 10 series, tab20 up to 20, then evenly spaced hues)."""
    import matplotlib.pyplot as plt

    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("hsv")(i / n) for i in range(n)]


class Plots(L.Callback):
    """PNG plots in ``plots/`` at the end of fit: relative L1 change of each edited matrix (``norms.png``) and the
    evaluation metrics against the number of edits (``metrics.png``: scores in [0, 1] on one panel, perplexities on
    their own, the legend beside the data)."""

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        out = _log_dir(trainer) / "plots"
        out.mkdir(exist_ok=True)
        rows = pl_module.extra_state.get("norms", [])
        if rows:
            fig, ax = plt.subplots(figsize=(7, 4))
            names = sorted({r["module"] for r in rows})
            for name, colour in zip(names, _distinct_colours(len(names))):
                pts = [(r["edits"], 100 * r["l1_rel_change"]) for r in rows if r["module"] == name]
                ax.plot(*zip(*pts), label=name, color=colour)
            ax.set(xlabel="edits", ylabel="L1 norm change (%)", title="Edited-matrix deviation (EAC Fig. 2a)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
            fig.tight_layout()
            fig.savefig(out / "norms.png", dpi=120)
            plt.close(fig)
        evals = pl_module.extra_state.get("evaluations", [])
        if evals:
            keys = [k for k in evals[-1] if k.startswith(("edit/reliability", "edit/generalization", "edit/locality",
                                                          "edit/live_", "general/"))]
            scores = [k for k in keys if not k.endswith("ppl")]
            ppls = [k for k in keys if k.endswith("ppl")]
            colours = dict(zip(keys, _distinct_colours(len(keys))))
            panels = [(scores, "score")] + ([(ppls, "perplexity")] if ppls else [])
            fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 3, 4), squeeze=False)
            for ax, (group, ylabel) in zip(axes[0], panels):
                for k in group:
                    pts = [(e["edits"], e[k]) for e in evals if k in e]
                    ax.plot(*zip(*pts), marker="o", label=k, color=colours[k])
                ax.set(xlabel="edits", ylabel=ylabel)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(alpha=0.3)
            axes[0][0].set_title("Metrics against edits")
            handles = [h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]]
            axes[0][-1].legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left",
                               bbox_to_anchor=(1.01, 1))
            fig.tight_layout()
            fig.savefig(out / "metrics.png", dpi=120)
            plt.close(fig)
