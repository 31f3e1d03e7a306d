"""Gradio app: see and feel vidaccel's acceleration (``pip install -e ".[demo]"``)::

    python demos/app.py                   # http://127.0.0.1:7860
    python demos/app.py --port 7861 --share no

- **Model**: the shipped world model (``assets/world_model``; runs on a CPU), the same model with
  random weights (for testing), or a local diffusers Wan checkpoint run as text-to-video
  (``WanPipeline``) or autoregressively (``CausalWanPipeline``).
- **Methods**: TempCache, AnnSA, AnnCA, FlashBlock and FreeSwim, each offered where it applies to
  the chosen pipeline, with its main parameters (defaults read from the config dataclasses).
- **Compare**: the dense and the accelerated pipeline on the same seed; both videos side by side
  (and the game's true frames for the world model), per-chunk latency and memory of both, and a
  table of total time, speedup, peak memory and fidelity (PSNR/SSIM against dense and, for the
  world model, against the truth).
- **Play** (world model): the arrow keys or the buttons pick the action of the next chunk; the
  accelerated pipeline generates it and its frames stream into the page, beside the true game.

One generation runs at a time (the GPU events share one queue of concurrency 1, and a lock), its
memory is released when it ends (``vidaccel.remove``, ``torch.cuda.empty_cache``), a bad value in
any field gives a message in the page, and Stop cancels a run between two transformer calls.

The callbacks are plain functions over a dict of field values, in ``vidaccel.pipelines.app``
(testable without a browser); this script only wires them to the page (:func:`build_app`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path

from vidaccel.pipelines.app.fields import (
    CHECKPOINT_ONLY,
    GENERATION_FIELDS,
    METHODS,
    T2V,
    T2V_ONLY,
    WORLD,
    WORLD_KINDS,
    WORLD_ONLY,
    Field,
    all_fields,
    default_values,
    general_field,
    method_fields,
    source_key,
)
from vidaccel.pipelines.app.models import load_model_message
from vidaccel.pipelines.app.play import PLAY_KEYS, play_start, play_step, play_stop
from vidaccel.pipelines.app.runners import TABLE_HEADERS, VIEW_SIZE, run_comparison, stop_run
from vidaccel.pipelines.app.state import OPTIONS
from vidaccel.pipelines.game import ACTIONS

KEYBOARD_JS = """
() => {
  const keys = %s;
  document.addEventListener("keydown", (event) => {
    const tag = (event.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "textarea" || tag === "select" || !(event.key in keys)) return;
    const button = document.getElementById("play-" + keys[event.key]);
    if (button && button.offsetParent !== null) { event.preventDefault(); button.click(); }
  });
}
""" % json.dumps(PLAY_KEYS)  # noqa: UP031 (the JS braces would need escaping in an f-string)
GPU = dict(concurrency_id="gpu", concurrency_limit=1)
"""Event options of every callback that runs the GPU: one shared queue of concurrency 1."""


def build_app(**initial):
    """The Gradio ``Blocks`` of the app (launch with :func:`launch`); ``initial``: field values the
    page starts with instead of the defaults (keys as ``default_values`` takes them)."""
    import gradio as gr

    with gr.Blocks(title="vidaccel demo", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# vidaccel: see and feel the acceleration\n"
            "Pick a model and turn methods on; **Run** generates with dense attention and with the methods "
            "on the same seed. **Play** drives the accelerated world model with the arrow keys."
        )
        page = _Page(gr, default_values(**initial))
        page.model_and_methods()
        page.compare_tab()
        page.play_tab()
        page.wire(demo)
    demo.queue(default_concurrency_limit=1)
    return demo


class _Page:
    """The components of the page, built in order inside a ``gr.Blocks`` (``components``: the field
    widgets by key), then wired to the callbacks of ``vidaccel.pipelines.app``."""

    def __init__(self, gr, start_values: dict) -> None:
        self.gr, self.start_values = gr, start_values
        self.fields = all_fields()
        self.components: dict[str, object] = {}
        self.method_boxes: dict[str, object] = {}

    def widget(self, f: Field):
        gr, value = self.gr, self.start_values[f.key]
        common = dict(label=f.label, info=f.info or None, elem_id=_elem_id(f.key))
        if f.kind == "bool":
            widget = gr.Checkbox(value=value, **common)
        elif f.kind == "choice":
            widget = gr.Dropdown(choices=list(f.choices), value=value, **common)
        elif f.kind in ("int", "float") and not f.optional:
            widget = gr.Number(value=value, precision=0 if f.kind == "int" else None, **common)
        else:
            placeholder = "empty: not set" if f.optional else None
            widget = gr.Textbox(value="" if value is None else str(value), placeholder=placeholder, **common)
        self.components[f.key] = widget
        return widget

    def model_and_methods(self) -> None:
        gr = self.gr
        with gr.Row():
            for key in ("model", "checkpoint"):
                self.widget(general_field(key))
            self.load = gr.Button("Load model", elem_id="load-button", scale=0)
        self.model_message = gr.Markdown(elem_id="model-message")
        with gr.Accordion("Generation", open=True), gr.Row():
            for key in GENERATION_FIELDS:
                self.widget(general_field(key))
        with gr.Accordion("Methods", open=True), gr.Row():
            for spec in METHODS:
                with gr.Column(min_width=200, elem_id=f"method-{spec.name.lower()}") as box:
                    if spec.config is None:
                        gr.Markdown(f"**{spec.name}**: not available in this vidaccel build.")
                    for f in method_fields(spec):
                        self.widget(f)
                self.method_boxes[spec.name] = box

    def compare_tab(self) -> None:
        gr = self.gr
        with gr.Tab("Compare"):
            with gr.Row():
                self.widget(general_field("warmup"))
                self.run = gr.Button("Run", variant="primary", elem_id="run-button")
                self.stop = gr.Button("Stop", variant="stop", elem_id="stop-button")
            self.message = gr.Markdown(elem_id="run-message")
            with gr.Row():
                self.dense_video = gr.Video(label="dense", elem_id="dense-video", autoplay=True, loop=True)
                self.accel_video = gr.Video(
                    label="accelerated", elem_id="accel-video", autoplay=True, loop=True
                )
                self.truth_video = gr.Video(
                    label="truth (the game)", elem_id="truth-video", autoplay=True, loop=True
                )
            self.plot = gr.Image(label="per chunk: latency and memory", type="filepath", elem_id="chunk-plot")
            self.table = gr.Dataframe(
                headers=TABLE_HEADERS, label="metrics", elem_id="metrics-table", interactive=False
            )

    def play_tab(self) -> None:
        gr = self.gr
        with gr.Tab("Play (world model)"):
            with gr.Row():
                self.widget(general_field("play_frames"))
                self.start = gr.Button("Start", variant="primary", elem_id="play-start")
                self.reset = gr.Button("Reset", elem_id="play-reset")
            self.play_message = gr.Markdown(elem_id="play-message")
            with gr.Row():
                self.model_frame = gr.Image(
                    label="world model (accelerated)", elem_id="play-model", height=VIEW_SIZE
                )
                self.true_frame = gr.Image(label="the game", elem_id="play-truth", height=VIEW_SIZE)
            with gr.Row():
                self.action_buttons = {a: gr.Button(a, elem_id=f"play-{a}") for a in ACTIONS}

    def field_values(self, data: dict) -> dict:
        """The field values of an event's ``{component: value}`` dict."""
        return {f.key: data[self.components[f.key]] for f in self.fields}

    def visibility(self, model) -> list:
        """Show the fields, method panels and truth video that apply to the ``model`` field value."""
        try:
            kind = source_key(model)
        except ValueError:
            kind = WORLD
        world = kind in WORLD_KINDS
        shown = {k: world for k in WORLD_ONLY} | {k: not world for k in CHECKPOINT_ONLY}
        shown |= {k: kind == T2V for k in T2V_ONLY}
        update = self.gr.update
        return [update(visible=shown[k]) for k in shown] + [
            update(visible=kind in spec.kinds) for spec in METHODS
        ] + [update(visible=world)]  # fmt: skip

    def wire(self, demo) -> None:
        gr, model = self.gr, self.components["model"]
        # A set of inputs reaches a callback as one {component: value} dict, which leaves the
        # positional slot after it for Gradio's progress tracker.
        inputs = {self.components[f.key] for f in self.fields}

        def run_event(data, progress=gr.Progress()):  # noqa: B008 (how Gradio injects its bar)
            return run_comparison(self.field_values(data), progress).as_tuple()

        toggled = [self.components[k] for k in (*WORLD_ONLY, *CHECKPOINT_ONLY, *T2V_ONLY)]
        shown = [*toggled, *self.method_boxes.values(), self.truth_video]
        model.change(self.visibility, model, shown)
        demo.load(self.visibility, model, shown)
        self.load.click(load_model_message, [model, self.components["checkpoint"]], self.model_message, **GPU)
        outputs = [self.dense_video, self.accel_video, self.truth_video, self.plot, self.table, self.message]
        running = self.run.click(run_event, inputs, outputs, **GPU)
        self.stop.click(stop_run, None, self.message, cancels=[running])
        frames = [self.model_frame, self.true_frame, self.play_message]
        self.start.click(lambda data: play_start(self.field_values(data)), inputs, frames, **GPU)
        self.reset.click(play_stop, None, self.play_message, **GPU)
        for action, button in self.action_buttons.items():
            button.click(functools.partial(play_step, action), None, frames, **GPU)


def launch(
    demo, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True
):
    """Start the server (``block=False`` returns at once, e.g. for tests); a blocking server closes
    the Play session when it stops."""
    try:
        return demo.launch(
            server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
            js=KEYBOARD_JS, footer_links=[], quiet=not block,
        )  # fmt: skip
    finally:
        if block:
            play_stop()


def _elem_id(key: str) -> str:
    return "field-" + key.replace(".", "-").replace("_", "-").lower()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=7860, help="server port (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--share", choices=("yes", "no"), default="no", help="a public gradio.live link")
    parser.add_argument(
        "--world-model",
        type=Path,
        default=None,
        help="world model folder (default: the shipped assets/world_model)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    OPTIONS["world_model"] = args.world_model
    logging.basicConfig(level=logging.INFO)
    launch(build_app(), host=args.host, port=args.port, share=args.share == "yes")


if __name__ == "__main__":
    main()
