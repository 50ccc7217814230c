"""posflow core: settings, wire contracts, storage, the local stack and the CLI."""

from posflow.errors import PosflowError
from posflow.settings import Settings

__all__ = ["PosflowError", "Settings", "__version__"]

__version__ = "0.1.0"
