"""Names that moved or were renamed, kept importable for one release with a ``DeprecationWarning``.

A module lists its old names and installs the lookup as its module ``__getattr__``::

    __getattr__ = renamed(__name__, {"TempCacheKV": ("MergedKVCache", lambda: MergedKVCache)})
"""

from __future__ import annotations

import warnings
from collections.abc import Callable


def renamed(module: str, names: dict[str, tuple[str, Callable[[], object]]]) -> Callable[[str], object]:
    """A module ``__getattr__`` serving ``names``: old name → (where it is now, a getter of the object).
    Each lookup warns with ``DeprecationWarning`` naming the new place; other names raise
    ``AttributeError`` as a module does."""

    def __getattr__(name: str):
        if name in names:
            new, get = names[name]
            warnings.warn(
                f"{module}.{name} is deprecated: use {new} (the old name goes in the next release)",
                DeprecationWarning,
                stacklevel=2,
            )
            return get()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
