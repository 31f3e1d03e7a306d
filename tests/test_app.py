"""The Gradio app script (``demos/app.py``): its command line and the page it builds. The callbacks
it wires are library code, tested without the script (``tests/test_app_{fields,compare,play}.py``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from _app import APP, load_app

from vidaccel.pipelines.app.fields import all_fields
from vidaccel.pipelines.app.state import OPTIONS
from vidaccel.pipelines.game import ACTIONS

LIBRARY = Path(__file__).resolve().parents[1] / "pipelines" / "app"


@pytest.fixture(scope="module")
def app():
    return load_app()


def test_page_has_the_controls(app):
    pytest.importorskip("gradio", reason="the page needs gradio (pip install -e '.[demo]')")
    demo = app.build_app(frames=3)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    expected = {"run-button", "stop-button", "dense-video", "accel-video", "truth-video", "metrics-table"}
    expected |= {"chunk-plot", "play-start"} | {f"play-{a}" for a in ACTIONS}
    expected |= {app._elem_id(f.key) for f in all_fields()}
    assert expected <= ids
    frames = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "field-frames")
    assert frames.value == 3


def test_command_line_reaches_the_server(app, monkeypatch, tmp_path):
    assert vars(app.parse_args([])) == {"port": 7860, "host": "127.0.0.1", "share": "no", "world_model": None}
    calls = []
    monkeypatch.setattr(app, "build_app", lambda: "page")
    monkeypatch.setattr(app, "launch", lambda demo, **options: calls.append((demo, options)))
    monkeypatch.setitem(OPTIONS, "world_model", None)
    app.main(["--port", "7861", "--host", "0.0.0.0", "--share", "yes", "--world-model", str(tmp_path)])
    assert calls == [("page", {"host": "0.0.0.0", "port": 7861, "share": True})]
    assert OPTIONS["world_model"] == tmp_path  # the library's setting, read when a model loads
    with pytest.raises(SystemExit):
        app.parse_args(["--share", "maybe"])


def test_script_runs_from_anywhere(tmp_path):
    """``python demos/app.py --help`` from another folder: the script imports only the library."""
    done = subprocess.run(
        [sys.executable, str(APP), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "--world-model" in done.stdout and "--share {yes,no}" in done.stdout


def test_only_the_script_imports_gradio():
    """gradio is optional: the library behind the page never imports it."""
    for path in sorted(LIBRARY.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(name.split(".")[0] == "gradio" for name in names), path.name
