"""Block-sparse layouts in the compact form the attention kernels consume.

A layout says, for each batch, head and query block, which key blocks the block's queries visit.
``plan_blocks`` turns a boolean block mask into per-query-block lists of key-block indices once,
so one layout serves every layer call that uses it (plan once, run many).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockPlan:
    """A block-sparse attention layout, planned once and reused by many attention calls.

    Attributes:
        block_mask: bool ``[B|1, H|1, n_q_blocks, n_k_blocks]``, the layout it was planned from.
        kv_indices: int32 ``[B|1, H|1, n_q_blocks, max_blocks]``; row ``r`` lists, ascending, the key
            blocks query block ``r`` visits in its first ``kv_counts[..., r]`` entries (the rest is padding).
        kv_counts: int32 ``[B|1, H|1, n_q_blocks]``.
        block_size: ``(bq, bk)``, tokens per query block and per key block.
    """

    block_mask: torch.Tensor
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    block_size: tuple[int, int]

    @property
    def num_blocks(self) -> tuple[int, int]:
        return self.block_mask.shape[-2], self.block_mask.shape[-1]

    def density(self) -> float:
        """Fraction of (query block, key block) pairs visited."""
        return float(self.block_mask.float().mean())

    def expand_mask(self, seq_q: int, seq_k: int) -> torch.Tensor:
        """Token-level bool mask ``[B|1, H|1, seq_q, seq_k]`` equivalent to the layout."""
        bq, bk = self.block_size
        mask = self.block_mask.repeat_interleave(bq, dim=-2).repeat_interleave(bk, dim=-1)
        return mask[..., :seq_q, :seq_k]

    def to(self, device: torch.device | str) -> BlockPlan:
        return BlockPlan(
            self.block_mask.to(device), self.kv_indices.to(device), self.kv_counts.to(device), self.block_size
        )


def check_block_size(block_size) -> tuple[int, int]:
    if (
        not isinstance(block_size, (tuple, list))
        or len(block_size) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block_size)
    ):
        raise ValueError(f"block_size must be a pair of positive ints (bq, bk), got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def plan_blocks(block_mask: torch.Tensor, block_size=(128, 128)) -> BlockPlan:
    """Plan a block-sparse layout: bool ``block_mask [B|1, H|1, nq, nk]`` -> :class:`BlockPlan`.

    Example::

        mask = torch.rand(1, 12, 256, 256) < 0.1          # 10% of 128x128 blocks
        plan = plan_blocks(mask, (128, 128))
        out = vidaccel.ops.attention(q, k, v, plan=plan)   # reuse ``plan`` for every layer
    """
    block_size = check_block_size(block_size)
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 4:
        got = f"{tuple(block_mask.shape)} {block_mask.dtype}" if isinstance(block_mask, torch.Tensor) else type(block_mask)
        raise ValueError(f"block_mask must be a 4-D bool tensor [B|1, H|1, n_q_blocks, n_k_blocks], got {got}")
    if block_mask.shape[-1] == 0 or block_mask.shape[-2] == 0:
        raise ValueError(f"block_mask must have at least one query and one key block, got {tuple(block_mask.shape)}")
    counts = block_mask.sum(dim=-1, dtype=torch.int32)
    # A stable sort of the negated mask puts the visited blocks first, in ascending order.
    order = torch.sort((~block_mask).to(torch.int8), dim=-1, stable=True).indices
    max_blocks = max(int(counts.max()), 1)
    kv_indices = order[..., :max_blocks].to(torch.int32).contiguous()
    return BlockPlan(block_mask, kv_indices, counts.contiguous(), block_size)
