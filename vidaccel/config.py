"""The method configurations, in one place to import them from: a face only (defines nothing).

Each config lives in its method's module (``vidaccel/processors/<method>.py``) beside the method's
runtime and its cache or plan types; :class:`MethodConfig`, the base, in
:mod:`vidaccel.processors.base`. ``from vidaccel.config import AnnSAConfig`` and
``vidaccel.AnnSAConfig`` are the same class.
"""

from vidaccel.processors.annca import AnnCAConfig
from vidaccel.processors.annsa import AnnSAConfig
from vidaccel.processors.base import MethodConfig
from vidaccel.processors.flashblock import FlashBlockConfig
from vidaccel.processors.freeswim import FreeSwimConfig
from vidaccel.processors.tempcache import TempCacheConfig

__all__ = [
    "AnnCAConfig",
    "AnnSAConfig",
    "FlashBlockConfig",
    "FreeSwimConfig",
    "MethodConfig",
    "TempCacheConfig",
]
