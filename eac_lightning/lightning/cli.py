"""``eac-lightning``: a thin ``main()`` around LightningCLI.

    eac-lightning fit --config configs/quickstart.yaml [--config configs/methods/memit-eac.yaml] [--data.num_edits 50]
    eac-lightning validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    eac-lightning stats --model testbed:small --layers [0,1,2]
    eac-lightning testbed --out DIR --preset small
    eac-lightning trace --model testbed:small --out DIR
    eac-lightning export CHECKPOINT OUT_DIR
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from eac_lightning.data.datamodule import EditDataModule
from eac_lightning.lightning.callbacks import EditLedger, Evaluation, NormTracker, Plots, WeightUpdate
from eac_lightning.lightning.checkpoint import AtomicCheckpointIO, CorruptCheckpointError
from eac_lightning.lightning.module import EditingModule

EXTRA_COMMANDS = ("stats", "testbed", "trace", "export")

# The edited model stays in eval mode on purpose (no dropout in target optimisations), and weights change in a
# callback, not in ``optimizer.step()``: these two Lightning warnings describe intended behaviour here.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")


class EditingCLI(LightningCLI):
    """LightningCLI with the editing callbacks, a fixed run folder and atomic checkpoints."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Evaluation, "eval")
        parser.add_lightning_class_args(NormTracker, "norms")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        root = Path(trainer.default_root_dir or "runs/default")
        trainer.default_root_dir = str(root)
        if trainer.logger in (None, True):
            # One folder per run (no version_N), so ``--ckpt_path last`` finds the run's own checkpoints.
            trainer.logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                       init_args=Namespace(save_dir=str(root), name="", version=""))
        if trainer.strategy == "ddp":
            trainer.strategy = Namespace(class_path="eac_lightning.lightning.strategy.EditingDDPStrategy",
                                         init_args=Namespace())
        if self.subcommand == "validate":
            trainer.limit_val_batches = 1  # the one step that evaluates the loaded model state
        if self.subcommand == "fit" and not cfg.get("ckpt_path") and any((root / "checkpoints").glob("*.ckpt")):
            raise SystemExit(
                f"{root}/checkpoints already holds checkpoints of an earlier run; resume it with --ckpt_path last "
                "or choose another --trainer.default_root_dir (nothing was overwritten)"
            )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint before any Trainer exists (for saved hyper-parameters); a damaged
        # file must fail here with its name, as it does later in AtomicCheckpointIO.
        try:
            super()._parse_ckpt_path()
        except Exception as err:
            sub = self.config.get("subcommand")
            path = self.config[sub].get("ckpt_path") if sub else None
            raise CorruptCheckpointError(
                f"checkpoint {path} is truncated or corrupt and cannot be loaded ({type(err).__name__}: {err}); "
                "nothing was changed - resume from another checkpoint"
            ) from err

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        # The write must precede every observer of the new weights; checkpoints come last (Lightning's rule).
        rank = {WeightUpdate: 0, ModelCheckpoint: 2}
        trainer.callbacks.sort(key=lambda c: next((v for k, v in rank.items() if isinstance(c, k)), 1))
        return trainer


def export_command(checkpoint: str, out_dir: str) -> None:
    """Save the edited model of a checkpoint in Hugging Face format (base model + deltas, tokenizer included).

    Args:
        checkpoint: an eac-lightning checkpoint (``.../checkpoints/last.ckpt``).
        out_dir: output folder, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    from eac_lightning.lightning.module import CKPT_KEY
    from eac_lightning.methods.base import apply_deltas
    from eac_lightning.models.loading import load_model

    ckpt = AtomicCheckpointIO().load_checkpoint(checkpoint)
    if CKPT_KEY not in ckpt:
        raise SystemExit(f"{checkpoint} was not written by eac-lightning (no '{CKPT_KEY}' section)")
    state = ckpt[CKPT_KEY]
    model, tok = load_model(state["model"])
    apply_deltas(model, state["deltas"])
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    print(f"exported {state['model']} with {len(state['deltas'])} edited matrices to {out_dir}")


def stats_command(model: str = "testbed:small", layers: list[int] | None = None, corpus: str | None = None,
                  num_tokens: int = 100_000, batch_size: int = 16, seq_len: int = 128, dtype: str = "float32",
                  device: str | None = None, import_file: str | None = None) -> None:
    """Precompute (and cache) the key covariance C = E[kkᵀ] of the edited layers, or import published ones.

    Args:
        model: ``testbed:<preset>``, a local folder or a hub id.
        layers: layers whose MLP output projection will be edited; default: the model's MEMIT layers and ROME layer.
        corpus: text corpus (local path or hub dataset name); default: a testbed's own training-stream sample,
            else WikiText-2.
        num_tokens: tokens averaged into C (a shorter corpus is warned about and cached under what it held).
        batch_size: windows per forward pass (bounds memory with ``seq_len``).
        seq_len: tokens per window.
        dtype: the model's weights' dtype (statistics accumulate in float64 whatever it is).
        device: where the model runs (default: CUDA when available, else the CPU).
        import_file: a ROME/MEMIT ``mom2`` ``.npz`` (``mom2.mom2``, ``mom2.count``) to use for the one layer in
            ``layers`` instead of computing it; cached under ``corpus`` and ``num_tokens``, so a run with
            ``--model.stats_corpus CORPUS --model.stats_tokens N`` uses it. Spelled ``--import`` too.
    """
    import torch

    from eac_lightning.models.adapters import mlp_out_name
    from eac_lightning.models.loading import default_layers, load_model
    from eac_lightning.stats.covariance import CovarianceStore

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    store = CovarianceStore(m, tok, corpus=corpus, num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size)
    names = [mlp_out_name(m, l) for l in layers]
    store.prefetch(names)
    for n in names:
        print(f"{n}: {store.get(n).count} tokens, {store.path(n, store.get(n).count)}")


def _extra_command(name: str):
    if name == "export":
        return export_command
    if name == "stats":
        return stats_command
    if name == "testbed":
        from eac_lightning.testbed.build import testbed_command

        return testbed_command
    from eac_lightning.testbed.causal_trace import trace_command

    return trace_command


def main(args: list[str] | None = None) -> None:
    """Entry point of ``eac-lightning`` (``args``: for calling from Python/tests; default ``sys.argv``)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in EXTRA_COMMANDS:
        from jsonargparse import CLI

        rest = argv[1:]
        if argv[0] == "stats":  # the short spellings of the issue: --import FILE, --layer N
            rest = [{"--import": "--import_file", "--layer": "--layers"}.get(a, a) for a in rest]
            rest = [f"[{rest[i]}]" if i and rest[i - 1] == "--layers" and not rest[i].startswith("[") else a
                    for i, a in enumerate(rest)]
        CLI(_extra_command(argv[0]), args=rest)
        return
    EditingCLI(
        EditingModule,
        EditDataModule,
        args=args,
        trainer_defaults={
            "max_epochs": 1,
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
                ModelCheckpoint(filename="edit-{step}", save_last=True, save_top_k=0, every_n_train_steps=1),
            ],
        },
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Sequential model editing. Other commands: " + ", ".join(EXTRA_COMMANDS)},
    )


if __name__ == "__main__":
    main()
