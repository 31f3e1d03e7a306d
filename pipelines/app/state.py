"""The app's process-wide state, all of it in this one module.

The app serves one page to many browsers from one process: one generation runs at a time
(:data:`GPU_LOCK`, whatever the Gradio queue does), the Stop button sets :data:`STOP`, the Compare
tab keeps one loaded model (:data:`LOADED`) and the Play tab one open session (:data:`PLAY`). It
imports nothing of the app, so every other module of it can import this one.
"""

from __future__ import annotations

import threading

OPTIONS: dict[str, object] = {"world_model": None}
"""App-wide settings: ``world_model``, the folder of the "shipped weights" world model (``None``:
``assets/world_model``; ``--world-model`` sets it, e.g. to a model of ``demos/train_world_model.py``)."""
GPU_LOCK = threading.RLock()
"""Held by every callback that runs the GPU: one generation at a time."""
STOP = threading.Event()
"""Set by the Stop button, checked before every transformer call of a Compare run."""
LOADED: dict[str, object] = {}
"""The model of the Compare tab, a :class:`~vidaccel.pipelines.app.models.LoadedModel` under
``"compare"`` (one at a time)."""
PLAY: dict[str, object] = {}
"""The open session of the Play tab, a :class:`~vidaccel.pipelines.app.play.PlaySession` under
``"session"`` (one at a time)."""
