"""``eac-lightning``: a thin ``main()`` around LightningCLI.

    eac-lightning fit --config configs/quickstart.yaml [--config configs/methods/memit-eac.yaml] [--data.num_edits 50]
    eac-lightning validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    eac-lightning stats --model testbed:small --layers [0,1,2] [--devices 2 --accelerator cpu] [--export_file C.npz]
    eac-lightning testbed DIR --preset small
    eac-lightning trace testbed:small DIR
    eac-lightning export RUN_OR_CHECKPOINT OUT_DIR
    eac-lightning ask RUN_OR_CHECKPOINT --prompt "The Eiffel Tower is located in"
    eac-lightning rollback RUN --to-edit K [--drop E ...]
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

from eac_lightning.data.datamodule import EditDataModule
from eac_lightning.lightning.callbacks import (
    EditLedger,
    Evaluation,
    NormTracker,
    Plots,
    WeightUpdate,
)
from eac_lightning.lightning.checkpoint import AtomicCheckpointIO, load_checkpoint_file
from eac_lightning.lightning.module import EditingModule
from eac_lightning.lightning.run_folder import RunLock, set_aside_unfinished_start
from eac_lightning.progress import LineProgressBar, stop_on_sigterm

EXTRA_COMMANDS = ("stats", "testbed", "trace", "export", "ask", "rollback")

# The edited model stays in eval mode on purpose (no dropout in target optimisations), and weights change in a
# callback, not in an optimizer: these three Lightning warnings describe intended behaviour here. The fourth warns that
# a resumed stream's DataLoader has no state; the stream resumes from the datamodule's position, which every
# checkpoint holds (data/datamodule.py), so no edit is repeated or skipped.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
warnings.filterwarnings("ignore", message=".*configure_optimizers` returned `None`.*")
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
# The edit stream is read in the main process (num_workers=0), so the length of its IterableDataset is exact.
warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
# Lightning's own use of a deprecated torch pytree API (not a call of ours): printed on every fit otherwise.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


class _NoAdvert(logging.Filter):
    """Drops Lightning's advertisement for its cloud logger, printed at every fit (a user of this tool has its logs
    in the run folder)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LitLogger" not in str(record.msg)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvert())


def hyperparameter_help() -> str:
    """Every field of the methods' nested settings, with its default and meaning (from the dataclasses' docstrings),
    for the end of ``fit --help``: jsonargparse lists a method's own arguments (``--model.method.help ROME``) but
    not the fields of its optional dataclass arguments."""
    import dataclasses
    import textwrap

    from docstring_parser import parse

    from eac_lightning.methods import (
        ContextTemplateParams,
        EACHyperParams,
        FTHyperParams,
        TargetHyperParams,
    )
    from eac_lightning.methods.beac import BEACHyperParams

    groups = [
        ("target (ROME's v*, MEMIT / AlphaEdit / B-EAC's z)", TargetHyperParams),
        ("target (FT)", FTHyperParams),
        ("context (ROME, MEMIT, AlphaEdit, B-EAC)", ContextTemplateParams),
        ("eac (every method; null: no EAC)", EACHyperParams),
        ("beac (B-EAC)", BEACHyperParams),
    ]
    lines = ["method settings (e.g. --model.method.init_args.eac.gamma 80 or a config's model.method.init_args; "
             "a method's own arguments: --model.method.help ROME|MEMIT|AlphaEdit|UltraEdit|FT|BEAC|BEACMEMIT):"]
    for title, cls in groups:
        docs = {p.arg_name: " ".join(p.description.split()) for p in parse(cls.__doc__).params}
        lines.append(f"  {title}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = f"{f.name} (default {default!r}): {docs.get(f.name, '')}"
            lines += textwrap.wrap(text, 116, initial_indent="    ", subsequent_indent="        ")
    return "\n".join(lines)


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, keeping the line breaks of descriptions and epilogs (the settings list)."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))


def _is_launching_process() -> bool:
    """False in the processes a DDP launcher starts for ranks > 0 (they share the launching run's lock)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


class EditingCLI(LightningCLI):
    """LightningCLI with the editing callbacks, a fixed run folder and atomic checkpoints. Subcommands: ``fit``
    (edit) and ``validate`` (evaluate a checkpoint); an edit stream has nothing for ``test`` or ``predict``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def parse_arguments(self, parser, args) -> None:
        self._argv = list(sys.argv[1:] if args is None else args)  # what was given: the settings resolver reads it
        _refuse_renamed_method_settings(self._argv)
        refuse_moved_settings(self._argv)
        spelled = nested_nulls_as_mappings(self._argv)
        if spelled != self._argv and args is None:
            sys.argv[1:] = spelled  # what Lightning reads (and what the other ranks of a DDP run re-run)
        elif spelled != self._argv:
            args = spelled
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser) -> None:
        parser.epilog = hyperparameter_help()
        parser.add_lightning_class_args(Evaluation, "eval")
        parser.add_lightning_class_args(NormTracker, "norms")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        root = Path(trainer.default_root_dir or "runs/default")
        trainer.default_root_dir = str(root)
        if trainer.logger in (None, True):
            # One folder per run (no version_N); metrics.csv kept whole across resumes.
            trainer.logger = Namespace(class_path="eac_lightning.lightning.run_folder.RunCSVLogger",
                                       init_args=Namespace(save_dir=str(root), name="", version=""))
        trainer.strategy = _editing_strategy(trainer)
        self.settings_record = _apply_model_settings(cfg.model, self._argv)
        if self.subcommand == "validate":
            trainer.limit_val_batches = 1  # the one step that evaluates the loaded model state
        if self.subcommand == "fit" and not cfg.get("ckpt_path") and any((root / "checkpoints").glob("*.ckpt")):
            raise SystemExit(
                f"{root}/checkpoints already holds checkpoints of an earlier run; resume it with --ckpt_path last "
                "or choose another --trainer.default_root_dir (nothing was overwritten)"
            )
        no_checkpoint = cfg.get("ckpt_path") == "last" and not (root / "checkpoints" / "last.ckpt").is_file()
        if no_checkpoint and not _is_launching_process():
            cfg.ckpt_path = None  # a DDP rank > 0: the launching process started the run over (below)
        elif no_checkpoint and not (self.subcommand == "fit" and (root / "history" / "HEAD").is_file()):
            raise SystemExit(f"--ckpt_path last: {root}/checkpoints/last.ckpt does not exist, so there is nothing "
                             "to resume; start the run without --ckpt_path")
        if self.subcommand in ("fit", "validate") and _is_launching_process():
            lock = RunLock(root)
            lock.acquire()  # released at exit; a killed run's lock is taken over by the next one
            atexit.register(lock.release)
            if no_checkpoint:
                # Stopped during its first edit step: no checkpoint stands at its records, so the run starts over
                # (one step of work) with them kept aside, rather than refusing both a resume and a fresh start.
                aside = set_aside_unfinished_start(root)
                print(f"--ckpt_path last: {root} stopped before its first checkpoint; starting the run over "
                      f"(its records moved to {aside})", file=sys.stderr)
                cfg.ckpt_path = None

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint before any Trainer exists (for saved hyper-parameters); a damaged or
        # unsafe file must fail here with its name, as it does later in AtomicCheckpointIO.
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path and Path(path).is_file():
            load_checkpoint_file(path)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs):
        self.model.method.method_settings = self.settings_record
        config = self._get(self.config_init, "trainer", default={})
        chosen = config.get("callbacks") or []
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in chosen):
            # Lightning's default bar only redraws one line; this one also reads well in a log file
            kwargs["callbacks"] = [*chosen, LineProgressBar()]
        trainer = super().instantiate_trainer(**kwargs)
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for cb in trainer.checkpoint_callbacks:  # in the run folder whatever the logger, so ``last`` finds them
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        return trainer


def _device_count(devices, accelerator) -> int:
    """How many devices ``--trainer.devices`` asks for (``-1``/``"auto"``: the CUDA devices present, else 1)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        if text in ("auto", "-1"):
            devices = -1
        else:
            try:
                devices = int(text)
            except ValueError:
                return 1
    if devices == -1:
        import torch

        wants_gpu = str(accelerator or "auto").lower() in ("auto", "gpu", "cuda")
        return torch.cuda.device_count() if wants_gpu and torch.cuda.is_available() else 1
    return devices if isinstance(devices, int) else 1


def _editing_strategy(trainer: Namespace):
    """The trainer's strategy for an edit stream: ``ddp``, and ``auto`` with several devices or nodes (which
    Lightning would turn into a DistributedDataParallel wrapper that fails), become the editing DDP strategy
    (:class:`~eac_lightning.lightning.strategy.EditingDDPStrategy`); a DDP variant that wraps the module is
    refused with the fix."""
    strategy = trainer.get("strategy", "auto")
    if not isinstance(strategy, str):
        return strategy
    several = _device_count(trainer.get("devices", 1), trainer.get("accelerator")) > 1 or (
        (trainer.get("num_nodes") or 1) > 1)
    if strategy == "auto" and several:
        if _is_launching_process():
            print(f"--trainer.devices {trainer.get('devices')}: several devices, so the run uses the editing DDP "
                  "strategy (--trainer.strategy ddp; docs/multi_device.md)", file=sys.stderr)
        strategy = "ddp"
    if strategy.startswith("ddp_"):  # ddp_spawn, ddp_fork, ddp_notebook, ddp_find_unused_parameters_*
        raise ValueError(f"--trainer.strategy {strategy} wraps the model in DistributedDataParallel, which editing "
                         "cannot use (no weight has a gradient); use --trainer.strategy ddp, the editing DDP strategy "
                         "(docs/multi_device.md)")
    if strategy == "ddp":
        return Namespace(class_path="eac_lightning.lightning.strategy.EditingDDPStrategy", init_args=Namespace())
    return strategy


#: Settings that moved, by old key: the new key (``{}``: the rest of the old key after its prefix).
MOVED_SETTINGS = {"model.evaluation": "eval"}


def _moved(key: str) -> str | None:
    """The new spelling of ``key`` (``model.evaluation.tasks`` -> ``eval.tasks``), or None when it did not move."""
    for old, new in MOVED_SETTINGS.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def _config_keys(tree, prefix: str = ""):
    """Every dotted key of a parsed config (sections and leaves)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}{k}"
            yield key
            yield from _config_keys(v, key + ".")


def refuse_moved_settings(argv: list[str]) -> None:
    """Refuse a setting under its old spelling, naming the new one: every evaluation setting is in ``eval:``
    (``--eval.*``, the :class:`~eac_lightning.lightning.callbacks.Evaluation` callback), where ``model.evaluation``
    held what is measured. Reads the command line and the config files it names (``--config FILE``, ``--model
    FILE``)."""
    import argparse

    import yaml

    why = "every evaluation setting (when: every; what: tasks, limits, probes, live_metrics, ...) is in eval:"

    def refuse(message: str) -> None:
        raise argparse.ArgumentError(None, f"{message}: {why} (docs/evaluation.md, Configuration)")

    for i, arg in enumerate(argv):
        option, eq, value = arg.partition("=")
        if option.startswith("--") and _moved(option[2:]):
            refuse(f"{option} is now --{_moved(option[2:])}")
        section = {"--config": "", "-c": "", "--model": "model."}.get(option)
        if section is None:
            continue
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        path = Path(value)
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8") if path.is_file() else value)
        except (OSError, yaml.YAMLError):
            continue  # not a config this check can read: the parser reports it
        for key in _config_keys(tree, section):
            if _moved(key):
                refuse(f"{value}: {key} is now {_moved(key)}; move its keys there")


NULLS = ("null", "None", "none", "~")


def nested_nulls_as_mappings(argv: list[str]) -> list[str]:
    """``--X.init_args.a.b null`` spelled as ``--X.init_args.a '{b: null}'``, which means the same. jsonargparse
    refuses null for an Optional field of a dataclass inside a class's init_args when it comes as its own dotted
    flag (it validates the string "None"), and accepts it inside the mapping; every other argument is left as it
    is."""
    out, i = [], 0
    while i < len(argv):
        option, eq, value = argv[i].partition("=")
        step = 1
        if not eq and i + 1 < len(argv):
            value, step = argv[i + 1], 2
        head, sep, nested = option.partition(".init_args.")
        if option.startswith("--") and sep and "." in nested and (eq or step == 2) and value in NULLS:
            parent, _, leaf = option.rpartition(".")
            out += [parent, f"{{{leaf}: null}}"]
            i += step
            continue
        out.append(argv[i])
        i += 1
    return out


def _refuse_renamed_method_settings(argv: list[str]) -> None:
    """A method setting given under its old name is refused with the new one (a usage error, as the parser's), not
    with the parser's unknown-key error (:data:`eac_lightning.methods.settings.RENAMED`)."""
    import argparse

    from eac_lightning.methods.settings import renamed_in_argv

    refusal = renamed_in_argv(argv)
    if refusal:
        raise argparse.ArgumentError(None, refusal)


def _namespace(tree: dict) -> Namespace:
    return Namespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in tree.items()})


def _apply_model_settings(model_cfg: Namespace, argv: list[str]) -> dict:
    """Resolve the method's settings (:mod:`eac_lightning.methods.settings`: preset, then the model's measured
    settings with ``--model.method_settings auto``, the default, then yours as the command line gave them); prints
    each setting's source once and returns the record summary.json keeps."""
    from eac_lightning.methods.settings import apply_model_settings, describe, given_leaves

    if model_cfg.get("method_settings", "auto") != "auto" or model_cfg.get("method") is None:
        return {}
    spec, record = apply_model_settings(model_cfg.model, model_cfg.method.as_dict(), given_leaves(argv))
    if record.get("changed"):
        model_cfg.method = _namespace(spec)
    if record and _is_launching_process():
        print(describe(record, model_cfg.model), file=sys.stderr)
    return record


def stats_command(model: str = "testbed:small", layers: list[int] | None = None, corpus: str | None = None,
                  num_tokens: int = 100_000, batch_size: int = 16, seq_len: int = 128, dtype: str = "float32",
                  device: str | None = None, import_file: str | None = None, export_file: str | None = None,
                  accelerator: str = "auto", devices: int = 1, num_nodes: int = 1, convergence: bool = False) -> None:
    """Precompute (and cache) the key covariance C = E[kkᵀ] of the edited layers, import published ones, or export
    them in the published format.

    Args:
        model: ``testbed:<preset>``, a local folder or a hub id.
        layers: layers whose MLP output projection will be edited; default: the model's MEMIT layers and ROME layer.
        corpus: text corpus (local path or hub dataset name); default: a testbed's own training-stream sample,
            else WikiText-2.
        num_tokens: tokens averaged into C (a shorter corpus is warned about and cached under what it held).
        batch_size: windows per forward pass (bounds memory with ``seq_len``).
        seq_len: tokens per window.
        dtype: the model's weights' dtype (statistics accumulate in float64 whatever it is).
        device: where the model runs in one process (default: CUDA when available, else the CPU).
        import_file: a ROME/MEMIT ``mom2`` ``.npz`` (``mom2.mom2``, ``mom2.count``) to use for the one layer in
            ``layers`` instead of computing it; cached under ``corpus`` and ``num_tokens``, so a run with
            ``--model.stats_corpus CORPUS --model.stats_tokens N`` uses it. Spelled ``--import`` too.
        export_file: write each layer's statistics as a ``mom2`` ``.npz`` that ``--import_file`` (and ROME's,
            MEMIT's and EasyEdit's code) reads; with several layers, ``-layer<N>`` is added before the suffix.
        accelerator: with ``devices`` or ``num_nodes`` above 1, the processes' accelerator (``cpu``, ``gpu``,
            ``auto``): Lightning Fabric starts one process per device, each reads its share of the corpus windows
            and the float64 sums are all-reduced (equal to one process up to float64 rounding). Resumable as one
            process is: each keeps its partial sums.
        devices: processes per node.
        num_nodes: nodes.
        convergence: also report how much the solve C⁻¹k still moves as tokens are added (relative change on
            held-out keys for C over 1/32 ... 1/2 of ``num_tokens``; one more pass over the corpus, one process):
            when the last figures are small, more tokens would not change the edits much.
    """
    import torch

    from eac_lightning.models.adapters import mlp_out_name
    from eac_lightning.models.loading import default_layers, load_model
    from eac_lightning.stats.covariance import CovarianceStore

    shard: dict = {}
    if devices > 1 or num_nodes > 1:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
        fabric.launch()  # one process per device (this command runs again in each)

        def all_reduce(t: torch.Tensor) -> None:
            t.copy_(fabric.all_reduce(t, reduce_op="sum"))

        shard = {"rank": fabric.global_rank, "world_size": fabric.world_size, "all_reduce": all_reduce}
        device = str(fabric.device)
    elif accelerator in ("cpu", "gpu", "cuda"):
        device = device or ("cpu" if accelerator == "cpu" else "cuda")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lead = shard.get("rank", 0) == 0
    m, tok = load_model(model, dtype=dtype, device=device)
    if import_file is not None:
        if not layers or len(layers) != 1:
            raise SystemExit("--import takes one mom2 file for one layer: give --layers [N] (or --layer N)")
        store = CovarianceStore(m, tok, corpus=corpus or "wikipedia", num_tokens=num_tokens)
        name = mlp_out_name(m, layers[0])
        c = store.import_mom2(name, import_file)
        print(f"{name}: imported {import_file} ({c.count} keys) -> {store.path(name)}\n"
              f"use it with --model.stats_corpus {store.corpus} --model.stats_tokens {num_tokens}")
        return
    if layers is None:
        d = default_layers(m)
        layers = sorted({d.rome, *d.memit})
    store = CovarianceStore(m, tok, corpus=corpus, num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size,
                            **shard)
    names = [mlp_out_name(m, l) for l in layers]
    store.prefetch(names)
    if not lead:
        return
    if convergence:
        from eac_lightning.stats.covariance import convergence_report

        report = convergence_report(m, tok, names, store.corpus, num_tokens, seq_len, batch_size, store.damping)
        for n, rows in report.items():
            print(f"{n}: relative change of C^-1 k on held-out keys against {num_tokens} tokens: " + ", ".join(
                f"{r['tokens']} tok {r['relative_change']:.3g}" for r in rows))
    for layer, n in zip(layers, names):
        line = f"{n}: {store.get(n).count} tokens, {store.path(n, store.get(n).count)}"
        if export_file is not None:
            out = Path(export_file)
            if len(names) > 1:
                out = out.with_name(f"{out.stem}-layer{layer}{out.suffix or '.npz'}")
            line += f"; exported to {store.export_mom2(n, out)}"
        print(line)


def _extra_command(name: str):
    if name == "ask":
        from eac_lightning.lightning.ask import ask_command

        return ask_command
    if name == "export":
        from eac_lightning.lightning.export import export_command

        return export_command
    if name == "stats":
        return stats_command
    if name == "testbed":
        from eac_lightning.testbed.build import testbed_command

        return testbed_command
    from eac_lightning.testbed.causal_trace import trace_command

    return trace_command


#: Exception classes (by module and name, so that reporting imports nothing) that are refusals with a message to act
#: on, beside ValueError (bad values and records), OSError (missing or unwritable files, a full disk) and
#: FloatingPointError (a non-finite edit): the checkpoint, lock, optimisation and testbed errors and Lightning's
#: configuration errors.
_REFUSALS = {
    "eac_lightning.lightning.checkpoint.CorruptCheckpointError",
    "eac_lightning.lightning.checkpoint.CheckpointMismatchError",
    "eac_lightning.lightning.run_folder.RunFolderLockedError",
    "eac_lightning.session.log.EditLogError",
    "eac_lightning.methods.target.EditOptimisationError",
    "eac_lightning.testbed.build.ShippedTestbedError",
    "lightning.fabric.utilities.exceptions.MisconfigurationException",
    "lightning_fabric.utilities.exceptions.MisconfigurationException",
    "argparse.ArgumentError",
    "jsonargparse._common.ArgumentError",
}
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1]) + os.sep
DEBUG_FLAG = "--debug"


def _is_refusal(exc: BaseException) -> bool:
    if isinstance(exc, (ValueError, OSError, FloatingPointError)):
        return True
    return any(f"{c.__module__}.{c.__qualname__}" in _REFUSALS for c in type(exc).__mro__)


def _raised_in(exc: BaseException) -> str:
    """The file of the frame that raised ``exc`` (``""`` when unknown)."""
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return out


def _refusal(exc: BaseException) -> tuple[BaseException, bool] | None:
    """The deliberate refusal behind ``exc``, and whether it came out of parsing the arguments; ``None`` for an
    internal error (a bug), which keeps its traceback.

    Lightning re-raises what a hook raised, and jsonargparse wraps an error raised in a class's ``__init__`` in its
    own ``ValueError`` listing every candidate type: the message shown is the outermost one the project raised (the
    innermost of the chain when the project raised none), provided its type is a refusal."""
    chain = _chain(exc)
    chosen = next((e for e in chain if _raised_in(e).startswith(_PACKAGE_DIR)), chain[-1])
    if not _is_refusal(chosen):
        return None
    outer = chain[:chain.index(chosen) + 1]
    usage = any(f"{os.sep}jsonargparse{os.sep}" in _raised_in(e) or "ArgumentError" in type(e).__name__
                for e in outer)
    return chosen, usage


def _message(exc: BaseException, argv: list[str]) -> str:
    """``exc``'s message on one line as the user reads it, with the option that gave a refused value where the
    message starts with its name (``gamma must be <= 100.0, got 101.0``) and the command line holds it."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        for name in (exc.filename, exc.filename2):
            if name is not None and str(name) not in text:
                text += f": {name}"
    else:
        text = str(exc).strip() or type(exc).__name__
    lead = text.split(" ", 1)[0]
    if " must " in text and lead.replace("_", "").replace(".", "").isalnum():
        for arg in argv:
            option = arg.split("=", 1)[0]
            if option.startswith("--") and (option[2:] == lead or option.endswith("." + lead)):
                text += f" (set by {option})"
                break
    return text


def _debugging(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether tracebacks are wanted (``--debug`` or ``EAC_DEBUG=1``)."""
    debug = DEBUG_FLAG in argv or os.environ.get("EAC_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return [a for a in argv if a != DEBUG_FLAG], debug


def _ask_prompts(rest: list[str]) -> list[str]:
    """``ask RUN "prompt" ["prompt" ...]``: prompts after the run folder become ``--prompt [...]``."""
    import json

    kept, prompts, i = rest[:1], [], 1
    while i < len(rest):
        arg = rest[i]
        if arg.startswith("--"):
            kept += rest[i:i + (1 if "=" in arg else 2)]
            i += 1 if "=" in arg else 2
        else:
            prompts.append(arg)
            i += 1
    return kept + (["--prompt", json.dumps(prompts)] if prompts else [])


def _dispatch(argv: list[str], cli_args: list[str] | None) -> None:
    if argv and argv[0] == "rollback":
        from eac_lightning.lightning.rollback import rollback_command

        rollback_command(argv[1:])
        return
    if argv and argv[0] in EXTRA_COMMANDS:
        from jsonargparse import CLI

        rest = argv[1:]
        if argv[0] == "stats":  # the short spellings of the issue: --import FILE, --layer N
            rest = [{"--import": "--import_file", "--layer": "--layers"}.get(a, a) for a in rest]
            rest = [f"[{rest[i]}]" if i and rest[i - 1] == "--layers" and not rest[i].startswith("[") else a
                    for i, a in enumerate(rest)]
        if argv[0] == "ask":
            rest = _ask_prompts(rest)
        CLI(_extra_command(argv[0]), args=rest)
        return
    EditingCLI(
        EditingModule,
        EditDataModule,
        args=cli_args,
        trainer_defaults={
            "max_epochs": 1,
            "log_every_n_steps": 1,  # metrics are logged by the callbacks when they measure; no interval to warn about
            "accelerator": "auto",
            "devices": 1,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "use_distributed_sampler": False,
            "enable_model_summary": False,
            "callbacks": [
                WeightUpdate(),
                EditLedger(),
                Plots(),
                # One checkpoint, overwritten every step: the edits are in the edit log (history/), whose entries
                # keep what ``rollback`` needs to return to any step. No version counter: a resume under another
                # spelling of the run folder must not start a last-v1.ckpt beside the run's one current state.
                ModelCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=1, enable_version_counter=False),
            ],
        },
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Sequential model editing. Other commands: " + ", ".join(EXTRA_COMMANDS),
                       "formatter_class": _HelpFormatter},
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``eac-lightning`` (``args``: for calling from Python/tests; default ``sys.argv``).

    A refusal (a bad value, a missing or damaged file, a locked run folder, a mismatched checkpoint, a full disk)
    ends the process with one line on stderr, ``eac-lightning: error: <message>``, and exit status 1 (2 for a value
    refused while parsing the arguments); any other exception is an internal error and keeps its traceback.
    ``--debug`` anywhere on the command line, or ``EAC_DEBUG=1``, shows the traceback of a refusal too."""
    from_command_line = args is None
    argv, debug = _debugging(sys.argv[1:] if args is None else list(args))
    if from_command_line and debug:
        sys.argv[1:] = argv  # what Lightning reads, and re-runs for the other ranks of a DDP run
        os.environ["EAC_DEBUG"] = "1"  # ... which then debug too
    previous = signal.getsignal(signal.SIGTERM)
    stop_on_sigterm()
    try:
        _dispatch(argv, None if from_command_line else argv)
    except SystemExit as exc:
        if debug or not isinstance(exc.code, str):
            raise
        print(f"eac-lightning: error: {exc.code}", file=sys.stderr)  # a refusal spelled as SystemExit("...")
        raise SystemExit(1) from None
    except Exception as exc:
        found = None if debug else _refusal(exc)
        if found is None:
            if not debug and hasattr(exc, "add_note"):
                exc.add_note("eac-lightning: this is an internal error, not a refusal with a fix: please report it "
                             "with this traceback")
            raise
        refusal, usage = found
        print(f"eac-lightning: error: {_message(refusal, argv)}", file=sys.stderr)
        raise SystemExit(2 if usage else 1) from None
    finally:
        if not from_command_line:  # called from Python (a notebook, a test): its own SIGTERM handling comes back
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
