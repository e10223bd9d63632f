"""The packed model: 32-bit words, task components, masks, codebooks, heads (DESIGN.md §2).

:class:`PackedStore` holds the tasks in memory, :func:`save_store`/:func:`load_store` move them
to and from one safetensors file, :func:`capacity` reports the paper's eq. 10, and
:func:`task_digest` / :meth:`PackedStore.parts` give the bit-for-bit check of a commit
(DESIGN.md §2 COMMIT). Modules depend one way only: ``packed`` on ``digest``; ``capacity``
on ``packed``; ``fileformat`` on ``packed`` and ``bits``.
"""

from qpacknet.layerspec import LayerSpec
from qpacknet.store.capacity import CapacityReport, NetworkCapacity, TaskCapacity, capacity
from qpacknet.store.digest import TaskParts, task_digest
from qpacknet.store.fileformat import load_store, save_store
from qpacknet.store.packed import PackedStore

__all__ = [
    "CapacityReport",
    "LayerSpec",
    "NetworkCapacity",
    "PackedStore",
    "TaskCapacity",
    "TaskParts",
    "capacity",
    "load_store",
    "save_store",
    "task_digest",
]
