"""Former name of :mod:`clipforge.models.heads` (the bow / caption models and their token
bookkeeping); kept so existing imports keep working."""

from .heads import *  # noqa: F401,F403
from .heads import __all__  # noqa: F401
