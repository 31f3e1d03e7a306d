"""The logic of the Gradio app (``demos/app.py``), without Gradio: see and feel vidaccel's acceleration.

The app's callbacks are plain functions over a dict of field values (:func:`default_values`),
testable without a browser; ``demos/app.py`` only wires them to the page. One module per seam:

- :mod:`~vidaccel.pipelines.app.fields`: the methods and fields the page offers, their values
  and checks (:func:`default_values`, :func:`method_configs`);
- :mod:`~vidaccel.pipelines.app.models`: loading a model (:func:`load_model`, the Load button's
  :func:`load_model_message`) and releasing its memory;
- :mod:`~vidaccel.pipelines.app.runners`: the Compare tab (:func:`run_comparison`, :func:`stop_run`);
- :mod:`~vidaccel.pipelines.app.play`: the Play tab (:func:`play_start`, :func:`play_step`,
  :func:`play_stop`);
- :mod:`~vidaccel.pipelines.app.state`: the process-wide state (settings, GPU lock, Stop, sessions).
"""

from vidaccel.pipelines.app.fields import (
    METHODS,
    SOURCES,
    Field,
    MethodSpec,
    all_fields,
    default_values,
    method_configs,
    method_fields,
    source_key,
)
from vidaccel.pipelines.app.models import LoadedModel, load_model, load_model_message, release_memory
from vidaccel.pipelines.app.play import PLAY_KEYS, PlaySession, play_start, play_step, play_stop
from vidaccel.pipelines.app.runners import TABLE_HEADERS, RunResult, run_comparison, stop_run
from vidaccel.pipelines.app.state import OPTIONS

__all__ = [
    "METHODS",
    "OPTIONS",
    "PLAY_KEYS",
    "SOURCES",
    "TABLE_HEADERS",
    "Field",
    "LoadedModel",
    "MethodSpec",
    "PlaySession",
    "RunResult",
    "all_fields",
    "default_values",
    "load_model",
    "load_model_message",
    "method_configs",
    "method_fields",
    "play_start",
    "play_step",
    "play_stop",
    "release_memory",
    "run_comparison",
    "source_key",
    "stop_run",
]
