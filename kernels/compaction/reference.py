"""Torch reference for KV compaction: copy slots to slots in every layer's K and V buffer."""

from __future__ import annotations

from typing import Sequence

import torch


def copy_slots_reference(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    source_slots: torch.Tensor,
    destination_slots: torch.Tensor,
) -> None:
    """``buffer[destination_slots[i]] = buffer[source_slots[i]]`` for every layer's K and V.

    Source and destination slots must not overlap (fresh pages): the gather is taken before the
    scatter, so an overlap would still be read-before-write here but not in the Triton kernel.
    """
    source = source_slots.long()
    destination = destination_slots.long()
    for buffer in list(k_buffers) + list(v_buffers):
        buffer[destination] = buffer[source]
