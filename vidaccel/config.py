"""Method configurations: one documented dataclass per acceleration method.

A config holds what a user chooses (meaning fields such as sparsity, window or threshold, and
performance fields such as tile sizes), validates it in ``__post_init__``, and builds the runtime
:class:`~vidaccel.processors.base.Method` that a processor runs::

    @dataclass
    class MyConfig(MethodConfig):
        top_p: float = 0.9        # meaning: attention mass each query keeps

        def __post_init__(self):
            self.check_range("top_p", low=0.0, high=1.0, low_open=True)

        def build(self) -> Method:
            return MyMethod(self)

    processor = vidaccel.AccelProcessor(MyConfig(top_p=0.8))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vidaccel.processors.base import Method

__all__ = ["MethodConfig"]


@dataclass
class MethodConfig(ABC):
    """Base of every method's configuration.

    Subclasses are ``@dataclass`` es whose fields are the method's options. They validate every field
    in ``__post_init__`` (use :meth:`check_range`, which names the field and the allowed range in its
    ``ValueError``) and implement :meth:`build`. A config is plain data: it holds no tensors and no
    per-layer state, so one config may build the methods of many processors.
    """

    @abstractmethod
    def build(self) -> Method:
        """The runtime :class:`~vidaccel.processors.base.Method` this config describes."""

    def check_range(
        self,
        field: str,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
        integer: bool = False,
    ) -> None:
        """Raise ``ValueError`` unless ``self.<field>`` is a number in the given range.

        ``low``/``high`` bound the range (``None``: unbounded), inclusive unless ``low_open`` /
        ``high_open``; ``integer`` also requires an ``int`` (``bool`` is never accepted). The message
        names the config, the field, the allowed range and the value, e.g.
        ``"AnnSAConfig.top_p must be a float in (0, 1], got 1.5"``.
        """
        value = getattr(self, field)
        kind = "an int" if integer else "a float"
        left = "-inf" if low is None else _fmt(low)
        right = "inf" if high is None else _fmt(high)
        allowed = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
        ok = (
            is_number
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high))
        )
        if not ok:
            raise ValueError(f"{type(self).__name__}.{field} must be {kind} in {allowed}, got {value!r}")


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)
