"""Editing methods: one file each. EAC (``eac.py``) wraps the target optimisation of any of them."""

from eac_lightning.methods.alphaedit import AlphaEdit
from eac_lightning.methods.base import Deltas, EditMethod, apply_deltas, undo_deltas
from eac_lightning.methods.eac import EACHyperParams
from eac_lightning.methods.ft import FT, FTHyperParams
from eac_lightning.methods.memit import MEMIT
from eac_lightning.methods.rome import ROME
from eac_lightning.methods.ultraedit import UltraEdit
from eac_lightning.methods.target import ContextTemplateParams, EditOptimisationError, TargetHyperParams

__all__ = [
    "AlphaEdit", "ContextTemplateParams", "Deltas", "EACHyperParams", "EditMethod", "EditOptimisationError", "FT",
    "FTHyperParams", "MEMIT", "ROME", "TargetHyperParams", "UltraEdit", "apply_deltas",
    "undo_deltas",
]
