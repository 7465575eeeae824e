"""eac-lightning: sequential model editing with Editing Anchor Compression on PyTorch Lightning."""

from eac_lightning import testbed  # noqa: F401  (registers the ``testbed:`` model source)
from eac_lightning.data.requests import EditRequest, MalformedRequestError
from eac_lightning.editor import Editor, method_from_preset
from eac_lightning.models.loading import load_model

__all__ = ["EditRequest", "Editor", "MalformedRequestError", "load_model", "method_from_preset"]
__version__ = "0.1.0"
