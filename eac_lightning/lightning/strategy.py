"""DDP for editing: the process group and launch of Lightning's DDPStrategy, without the
``DistributedDataParallel`` wrapper.

Editing has no gradient to all-reduce (targets are optimised per edit on every rank and weights change only by
closed forms), so wrapping the module would fail ("DDP is not needed when a module doesn't have any parameter
that requires a gradient") and would add nothing. Consistency across ranks is kept by broadcasting the deltas
(:class:`~eac_lightning.lightning.callbacks.WeightUpdate`); evaluation is sharded and reduced by torchmetrics.
``--trainer.strategy ddp`` selects this strategy (:class:`~eac_lightning.lightning.cli.EditingCLI`).
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy


class EditingDDPStrategy(DDPStrategy):
    strategy_name = "ddp_edit"

    def configure_ddp(self) -> None:
        # Keep the LightningModule unwrapped: training_step is then called directly on every rank.
        pass
