"""Former name of :mod:`clipforge.training.token_losses` (the bow / caption losses and the module
DDP wraps for them); kept so existing imports keep working."""

from .token_losses import *  # noqa: F401,F403
from .token_losses import __all__  # noqa: F401
