"""FreeSwim: inward sliding-window self-attention and the cross-attention override (shared/METHODS.md).

Self-attention of the *window branch* runs :func:`vidaccel.ops.window_attention` with the half-window
of the training grid; the *full branch* runs dense self-attention; both with the temperature scale.
A processor cannot fork the transformer's batch by itself: :class:`~vidaccel.pipelines.FreeSwimWanPipeline`
does, and tells the processors the layout of each forward (a :class:`FreeSwimBatch`, set with
:func:`set_freeswim_batch` on the step context):

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

import math
from dataclasses import dataclass

import torch

from vidaccel import ops
from vidaccel._compat import renamed

from .base import AttentionCall, AttentionResult, Method, MethodConfig, Proceed, named_processor

__all__ = [
    "FreeSwim",
    "FreeSwimBatch",
    "FreeSwimConfig",
    "FreeSwimProcessor",
    "STATE_KEY",
    "freeswim_batch_of",
    "set_freeswim_batch",
]

STATE_KEY = "freeswim"
"""Key of :class:`FreeSwimBatch` in the step context's ``pipeline_state`` and of the per-block cache
in ``context.module_state(attn)``; use :func:`freeswim_batch_of` / :func:`set_freeswim_batch`."""

MODES = ("dual", "cached", "window")


@dataclass(frozen=True)
class FreeSwimConfig(MethodConfig):
    """FreeSwim: inward sliding-window self-attention with the cross-attention override, for
    generation above the model's training resolution (shared/METHODS.md, FreeSwim).

    Meaning fields:
        train_size: ``(height, width)`` in pixels the model was trained at, e.g. ``(480, 832)`` for
            Wan2.1-1.3B; the half-window is half its token grid: ``(15, 26)``.
        temperature: use the self-attention scale ``sqrt(log(N_target) / log(N_train) / d)`` with
            ``N`` the tokens per frame at the target and at the training size.
        cache_steps: ``FreeSwimWanPipeline`` runs the full-attention branch at the steps where
            ``step % cache_steps == 0`` and reuses its cached cross-attention outputs in between.
        offload_cache: keep those cached outputs (bf16, one per block) in CPU memory instead of on
            the GPU (about 0.53 GB per block for Wan-1.3B at 1088×1920×81).
        spatial_compression: pixels per token along height and width (Wan: VAE 8 × patch 2 = 16).
        half_window: ``(d_h, d_w)`` in tokens, overriding the one derived from ``train_size``.
        target_tokens: ``N_target`` for the temperature, overriding the target grid's tokens per
            frame (the published code hard-codes 3120).

    Performance fields:
        tiles: ``((q_rows, q_cols), (k_rows, k_cols))``, the query and key tiles of the window
            kernel (``None``: ``vidaccel.kernels.window.DEFAULT_TILES``).
    """

    train_size: tuple[int, int] = (480, 832)
    temperature: bool = True
    cache_steps: int = 1
    offload_cache: bool = False
    spatial_compression: int = 16
    half_window: tuple[int, int] | None = None
    target_tokens: int | None = None
    tiles: tuple[tuple[int, int], tuple[int, int]] | None = None

    def __post_init__(self):
        self.check_range("cache_steps", low=1, integer=True)
        self.check_range("spatial_compression", low=1, integer=True)
        for name in ("temperature", "offload_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FreeSwimConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not _int_pair(self.train_size, self.spatial_compression):
            raise ValueError(
                f"FreeSwimConfig.train_size must be (height, width), two ints >= spatial_compression "
                f"({self.spatial_compression}), got {self.train_size!r}"
            )
        object.__setattr__(self, "train_size", tuple(self.train_size))  # frozen: normalised once
        if self.half_window is not None:
            if not _int_pair(self.half_window, 0):
                raise ValueError(
                    f"FreeSwimConfig.half_window must be None or two ints >= 0, got {self.half_window!r}"
                )
            object.__setattr__(self, "half_window", tuple(self.half_window))
        if self.target_tokens is not None:
            self.check_range("target_tokens", low=1, integer=True)
        if self.tiles is not None:
            if not (
                isinstance(self.tiles, (tuple, list))
                and len(self.tiles) == 2
                and all(_int_pair(t, 1) for t in self.tiles)
            ):
                raise ValueError(
                    f"FreeSwimConfig.tiles must be None or ((q_rows, q_cols), (k_rows, k_cols)) of ints >= 1, got {self.tiles!r}"
                )
            object.__setattr__(self, "tiles", tuple(tuple(t) for t in self.tiles))

    @property
    def train_grid(self) -> tuple[int, int]:
        """Token rows and columns of one frame at ``train_size``, e.g. ``(30, 52)``."""
        return self.train_size[0] // self.spatial_compression, self.train_size[1] // self.spatial_compression

    @property
    def window(self) -> tuple[int, int]:
        """The half-window ``(d_h, d_w)`` in tokens: ``half_window`` or half the training grid."""
        if self.half_window is not None:
            return self.half_window
        return self.train_grid[0] // 2, self.train_grid[1] // 2

    def attention_scale(self, frame_tokens: int, head_dim: int) -> float | None:
        """Self-attention scale at ``frame_tokens`` tokens per frame, or ``None`` (``1/sqrt(d)``)
        without ``temperature``. ``sqrt(log_{N_train}(N_target) / d)``, never below ``1/sqrt(d)``
        (a target smaller than the training size is not sharpened the other way)."""
        if not self.temperature:
            return None
        n_train = self.train_grid[0] * self.train_grid[1]
        n_target = self.target_tokens if self.target_tokens is not None else frame_tokens
        if n_train <= 1 or n_target <= n_train:
            return None
        return math.sqrt(math.log(n_target) / math.log(n_train) / head_dim)

    def build(self) -> Method:
        return FreeSwim(self)


def _int_pair(value, low: int) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= low for x in value)
    )


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


def freeswim_batch_of(context) -> FreeSwimBatch | None:
    """The batch layout a FreeSwim pipeline announced for the current forward, or ``None``."""
    return None if context is None else context.pipeline_state.get(STATE_KEY)


def set_freeswim_batch(context, batch: FreeSwimBatch | None) -> None:
    """Announce the batch layout of the next forwards on ``context`` (``None``: no layout)."""
    if batch is None:
        context.pipeline_state.pop(STATE_KEY, None)
    else:
        context.pipeline_state[STATE_KEY] = batch


class FreeSwim(Method):
    """The runtime of :class:`FreeSwimConfig` (see the module docstring)."""

    kinds = frozenset({"self", "cross"})
    needs_context = True

    def __init__(self, config: FreeSwimConfig) -> None:
        super().__init__(config)
        self._warned: set[str] = set()

    def attend(self, call: AttentionCall, proceed: Proceed) -> AttentionResult:
        context = call.context
        if context is None:
            return proceed(call)  # the processor has warned: no grid, no batch layout
        batch = freeswim_batch_of(context)
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
        ops.warn_once(message, seen=self._warned, stacklevel=5)


FreeSwimProcessor = named_processor("FreeSwimProcessor", FreeSwimConfig, default=True)

"""Install it on a ``FreeSwimWanPipeline`` (``pipe.set_attn_processor(FreeSwimProcessor(config))``) for
the dual path; on other pipelines through ``vidaccel.apply(pipe, config)`` it serves window attention
(with the temperature) alone."""


__getattr__ = renamed(
    __name__, {"FreeSwimMethod": ("vidaccel.processors.freeswim.FreeSwim", lambda: FreeSwim)}
)
