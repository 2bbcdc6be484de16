"""Rotary position embeddings as the KV pool sees them: a spec, and rotation by position.

SGLang caches keys *after* RoPE. Two things need to undo or redo that rotation on cached keys:
scoring on pre-RoPE keys (a rotation puts high frequencies along the token axis that say
nothing about content) and re-basing a stream memory to contiguous positions (kept keys move
to new positions). Both read the model's own cos/sin table through :class:`RotarySpec`.
"""

from .reference import apply_rotary_reference, rerotate_slots_reference
from .spec import RotarySpec

__all__ = ["RotarySpec", "apply_rotary_reference", "rerotate_slots_reference"]
