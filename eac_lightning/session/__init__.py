"""A run's history and current state: the append-only edit log and the edit session that writes and replays it."""

from eac_lightning.session.log import EditLog, EditLogError
from eac_lightning.session.session import EditSession

__all__ = ["EditLog", "EditLogError", "EditSession"]
