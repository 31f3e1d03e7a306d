"""vidaccel.kernels — the attention kernel family (Triton) and its pure-PyTorch references.

The references and the block planner import without Triton; the Triton launchers
(``vidaccel.kernels.attention.attention_fwd``, ``vidaccel.kernels.merge.merge_attention_fwd``) are
imported where used, so that ``TRITON_INTERPRET`` can be set before Triton loads. This package never
imports diffusers.

This folder is reachable only as ``vidaccel.kernels``. The top-level name ``kernels`` belongs to the
PyPI package of that name (transformers requires it), and ``python`` started in the repository root
puts this folder on ``sys.path`` as ``kernels``: imported under that name, this file hands the name
over to the installed package (found on ``sys.path`` without the repository root) before anything
of ours runs. Where that package is not installed, ``kernels`` becomes an empty placeholder that
looks like no package to dependency probes (no ``__file__``, no ``__version__``: transformers and
diffusers then treat ``kernels`` as absent) and raises ``ModuleNotFoundError`` naming the problem on
any other attribute (``from kernels import get_kernel``).
"""

if __name__ != "vidaccel.kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

    def _outside_repo(entry):
        try:
            return _os.path.realpath(entry or _os.getcwd()) != _os.path.realpath(_root)
        except (OSError, TypeError):
            return True

    _spec = _machinery.PathFinder.find_spec(__name__, [p for p in _sys.path if _outside_repo(p)])
    if _spec is None or _spec.loader is None:
        _message = (
            f"the PyPI package 'kernels' is not installed (pip install kernels); the folder {_root}/kernels "
            "is vidaccel's attention kernels, importable only as 'vidaccel.kernels'"
        )

        def __getattr__(name):
            if name.startswith("__") and name.endswith("__"):
                raise AttributeError(name)
            raise ModuleNotFoundError(f"kernels.{name}: {_message}", name=__name__)

        __file__ = None
        __path__ = []
    else:
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            _sys.modules.pop(__name__, None)
            raise
else:
    from .plan import BlockPlan, plan_blocks
    from .reference import attention_reference, merge_attention_reference

    __all__ = ["BlockPlan", "plan_blocks", "attention_reference", "merge_attention_reference"]
