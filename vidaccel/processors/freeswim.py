"""FreeSwim: inward sliding-window self-attention and the cross-attention override (shared/METHODS.md).

Self-attention of the *window branch* runs :func:`vidaccel.ops.window_attention` with the half-window
of the training grid; the *full branch* runs dense self-attention; both with the temperature scale.
A processor cannot fork the transformer's batch by itself: :class:`~vidaccel.pipelines.FreeSwimWanPipeline`
does, and tells the processors the layout of each forward in
``context.pipeline_state["freeswim"]`` (a :class:`FreeSwimBatch`):

- ``"dual"``: the batch is the window rows followed by as many full rows (same latent, same prompt).
  Cross-attention runs on the full rows only; its output replaces the window rows' and is cached per
  block (bf16, on the CPU with ``offload_cache``), together with its LSE.
- ``"cached"``: window rows only; cross-attention answers from the cache of the last ``"dual"`` forward.
- ``"window"``: window rows only, cross-attention computed as usual (the unconditional CFG pass).

Without a ``FreeSwimBatch`` (e.g. ``vidaccel.apply(pipe, FreeSwimConfig())`` on a stock pipeline) every
row is a window row and cross-attention is left as it is. Example::

    pipe = FreeSwimWanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
    pipe.set_attn_processor(vidaccel.FreeSwimProcessor(vidaccel.FreeSwimConfig(cache_steps=5)))
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from vidaccel import ops
from vidaccel.config import FreeSwimConfig

from .base import AccelProcessor, AttentionCall, AttentionResult, Method, Proceed

__all__ = ["FreeSwimBatch", "FreeSwimMethod", "FreeSwimProcessor", "STATE_KEY"]

STATE_KEY = "freeswim"
"""Key of :class:`FreeSwimBatch` in ``context.pipeline_state`` and of the per-block cache in
``context.module_state(attn)``."""

MODES = ("dual", "cached", "window")


@dataclass(frozen=True)
class FreeSwimBatch:
    """The batch layout of one transformer forward, set by ``FreeSwimWanPipeline``.

    Attributes:
        mode: ``"dual"``, ``"cached"`` or ``"window"`` (see the module docstring).
        window_rows: number of window-branch rows, the first rows of the batch; in ``"dual"`` the
            batch holds ``2 * window_rows`` rows, full row ``window_rows + i`` paired with window row ``i``.
    """

    mode: str
    window_rows: int

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"FreeSwimBatch.mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.window_rows, int) or self.window_rows < 1:
            raise ValueError(f"FreeSwimBatch.window_rows must be an int >= 1, got {self.window_rows!r}")

    @property
    def batch_size(self) -> int:
        return 2 * self.window_rows if self.mode == "dual" else self.window_rows


class FreeSwimMethod(Method):
    """The runtime of :class:`~vidaccel.config.FreeSwimConfig` (see the module docstring)."""

    kinds = frozenset({"self", "cross"})
    needs_context = True

    def __init__(self, config: FreeSwimConfig) -> None:
        super().__init__(config)
        self._warned: set[str] = set()

    def attend(self, call: AttentionCall, proceed: Proceed) -> AttentionResult:
        context = call.context
        if context is None:
            return proceed(call)  # the processor has warned: no grid, no batch layout
        batch = context.pipeline_state.get(STATE_KEY)
        if batch is not None and call.q.shape[0] != batch.batch_size:
            raise RuntimeError(
                f"FreeSwim: the pipeline announced a {batch.mode!r} batch of {batch.batch_size} rows, but "
                f"attention got {call.q.shape[0]}"
            )
        if call.kind == "self":
            return self._self_attention(call, proceed, batch)
        return self._cross_attention(call, proceed, batch)

    def _self_attention(
        self, call: AttentionCall, proceed: Proceed, batch: FreeSwimBatch | None
    ) -> AttentionResult:
        grid = call.context.grid
        if (
            grid is None
            or grid[0] * grid[1] * grid[2] != call.q.shape[1]
            or call.k.shape[1] != call.q.shape[1]
        ):
            self._warn_once(
                f"FreeSwim: self-attention over {call.q.shape[1]} queries / {call.k.shape[1]} keys does not match "
                f"the token grid {grid}; running exact dense attention"
            )
            return proceed(call)
        scale = self.config.attention_scale(grid[1] * grid[2], call.q.shape[-1])
        scale = call.scale if scale is None else scale
        if batch is None or batch.mode != "dual":
            return self._window(call.replace(scale=scale), grid)
        n = batch.window_rows
        window = self._window(call.replace(q=call.q[:n], k=call.k[:n], v=call.v[:n], scale=scale), grid)
        full = proceed(call.replace(q=call.q[n:], k=call.k[n:], v=call.v[n:], scale=scale))
        return torch.cat([window[0], full[0]]), torch.cat([window[1], full[1]])

    def _window(self, call: AttentionCall, grid) -> AttentionResult:
        return ops.window_attention(
            call.q,
            call.k,
            call.v,
            grid=grid,
            half_window=self.config.window,
            scale=call.scale,
            return_lse=True,
            backend=call.backend,
            tiles=self.config.tiles,
        )

    def _cross_attention(
        self, call: AttentionCall, proceed: Proceed, batch: FreeSwimBatch | None
    ) -> AttentionResult:
        if batch is None or batch.mode == "window":
            return proceed(call)
        state = call.context.module_state(call.attn)
        if batch.mode == "cached":
            cached = state.get(STATE_KEY)
            if cached is None:
                raise RuntimeError(
                    "FreeSwim: a 'cached' forward found no cross-attention cache for "
                    f"{call.layer.name if call.layer else 'this layer'}: run a 'dual' forward first "
                    "(FreeSwimWanPipeline does at step 0)"
                )
            out, lse = cached
            return out.to(call.q.device, call.q.dtype, non_blocking=True), lse.to(
                call.q.device, non_blocking=True
            )
        n = batch.window_rows
        out, lse = proceed(call.replace(q=call.q[n:], k=call.k[n:], v=call.v[n:]))
        state[STATE_KEY] = (self._stash(out.to(torch.bfloat16)), self._stash(lse))
        return torch.cat([out, out]), torch.cat([lse, lse])

    def _stash(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor to keep in the cache: itself, or a pinned CPU copy with ``offload_cache``."""
        if not self.config.offload_cache or tensor.device.type == "cpu":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=4)


class FreeSwimProcessor(AccelProcessor):
    """:class:`AccelProcessor` with one :class:`~vidaccel.config.FreeSwimConfig`.

    Install it on a ``FreeSwimWanPipeline`` (``pipe.set_attn_processor(FreeSwimProcessor(config))``) for
    the dual path; on other pipelines through ``vidaccel.apply(pipe, config)`` it serves window
    attention (with the temperature) alone.
    """

    def __init__(self, config: FreeSwimConfig | None = None, *, backend: str = "auto") -> None:
        super().__init__(FreeSwimConfig() if config is None else config, backend=backend)
