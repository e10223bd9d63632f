"""The packed model: 32-bit words, task components, masks, codebooks, heads (DESIGN.md §2).

:class:`PackedStore` holds the tasks in memory, :func:`save`/:func:`load` move them to and from
one safetensors file, :func:`capacity` reports the paper's eq. 10, and :func:`task_digest` /
:meth:`PackedStore.parts` give the bit-for-bit check of a commit (DESIGN.md §2 COMMIT).
"""

from qpacknet.store.capacity import CapacityReport, TaskCapacity, capacity
from qpacknet.store.digest import TaskParts, task_digest
from qpacknet.store.fileformat import load, save
from qpacknet.store.packed import LayerSpec, PackedStore

__all__ = [
    "CapacityReport",
    "LayerSpec",
    "PackedStore",
    "TaskCapacity",
    "TaskParts",
    "capacity",
    "load",
    "save",
    "task_digest",
]
