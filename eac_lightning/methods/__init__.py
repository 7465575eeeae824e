"""Editing methods: one file each. EAC (``eac.py``) wraps the target optimisation of any of them; one edit of any
method runs through :func:`eac_lightning.methods.edit.edit`."""

from eac_lightning.methods.alphaedit import NAS, AlphaEdit
from eac_lightning.methods.base import Deltas, EditMethod, Written, apply_deltas
from eac_lightning.methods.eac import EACHyperParams
from eac_lightning.methods.edit import (
    EditRecord,
    EditResult,
    edit,
    optimise_targets,
    write_targets,
)
from eac_lightning.methods.ft import FT, FTHyperParams
from eac_lightning.methods.locate_then_edit import LocateThenEdit
from eac_lightning.methods.memit import MEMIT
from eac_lightning.methods.nas import NASHyperParams
from eac_lightning.methods.rome import ROME
from eac_lightning.methods.target import (
    ContextTemplateParams,
    EditOptimisationError,
    TargetHyperParams,
)
from eac_lightning.methods.ultraedit import UltraEdit

__all__ = [
    "AlphaEdit", "ContextTemplateParams", "Deltas", "EACHyperParams", "EditMethod", "EditOptimisationError",
    "EditRecord", "EditResult", "FT", "FTHyperParams", "LocateThenEdit", "MEMIT", "NAS", "NASHyperParams", "ROME",
    "TargetHyperParams", "UltraEdit", "Written", "apply_deltas", "edit", "optimise_targets", "write_targets",
]
