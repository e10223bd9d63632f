"""The packed model: every prunable weight owns one 32-bit word shared by the tasks.

DESIGN.md §2, "Terms" and COMMIT: a task that uses a weight owns a *component* of that weight's
word, ``b_t`` bits holding an index into the task's per-layer codebook of ``2**b_t`` float32
centroids. Components of successive tasks are appended at the next free bit offset of the word.
A weight is *available* while ``used_bits + b_max <= 32``, so no word ever exceeds 32 bits; with
8-bit components only that is the paper's ``T_L = 4`` tasks per weight.

Once committed a task is frozen: its weights are decoded from the words (never from a side copy
of its codes), so corruption of the words cannot go unnoticed and nothing learned later can
change the task's function.

Weight sharing (TinySubNets, DESIGN.md §2): a task may also carry per-layer *shared* masks of
weights that earlier tasks already claimed. A shared weight takes no component in the task's word
(it costs the task no bits) and reads the value of the word's *first* component, i.e. of the task
that claimed the weight first; since a claimed word's first component never changes, the shared
value is frozen like the rest of the earlier task.

Several networks (DESIGN.md §2, "When the words are full"): a long stream outgrows one set of
words. :meth:`PackedStore.grow` opens a new *network* -- the same layers with fresh, empty
words -- and every later commit goes there. Each task belongs to exactly one network (its
words, its availability, the weights it may share); the store is the list of networks plus
the task -> network map, and everything per task (decode, masks, parts) reads the task's own
network. A store that never grew is the single-network store of earlier releases.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from qpacknet.errors import StoreError
from qpacknet.layerspec import LayerSpec
from qpacknet.store.digest import TaskParts

WORD_BITS = 32


@dataclass
class _Task:
    """What the store keeps of a committed task (DESIGN.md §2, COMMIT).

    ``offsets[name]`` is the bit offset of each owned component inside its word, in the
    row-major order of ``masks[name].flatten().nonzero()``; with the mask and the layer's width
    ``widths[name]`` it is enough to read the codes back from the words.
    """

    widths: dict[str, int]
    masks: dict[str, torch.Tensor]
    offsets: dict[str, torch.Tensor]
    codebooks: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] | None = None
    network: int = 0
    owned: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    decoded: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def bit_width(self) -> int:
        """The widest layer's component width (``b_t`` when every layer has the same)."""
        return max(self.widths.values())


@dataclass
class _Network:
    """One network's words: ``words[name]`` int64 values in ``[0, 2**32)``, ``used[name]``
    (int16) the bits taken in each word, and the cached first-component values (sharing)."""

    words: dict[str, torch.Tensor]
    used: dict[str, torch.Tensor]
    first: dict[str, torch.Tensor] | None = None

    @classmethod
    def empty(cls, layers: tuple[LayerSpec, ...]) -> _Network:
        return cls(
            {s.name: torch.zeros(s.shape, dtype=torch.int64) for s in layers},
            {s.name: torch.zeros(s.shape, dtype=torch.int16) for s in layers},
        )


def _normalise_meta(meta: dict[str, Any] | None, what: str = "meta") -> dict[str, Any]:
    """Round-trip ``meta`` through strict JSON so the in-memory and saved copies are equal."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise StoreError(f"{what} must be a dict, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"{what} must be JSON-serialisable (it is saved in the model file header): {exc}"
        ) from exc


class PackedStore:
    """Tasks packed into the 32-bit words of the prunable weights (DESIGN.md §2).

    In memory, ``words[name]`` is an int64 tensor of the layer's shape holding values in
    ``[0, 2**32)`` and ``used_bits[name]`` (int16) how many low bits of each word are taken,
    per network; :attr:`words`, :attr:`used_bits`, :meth:`available`, :meth:`claimed` and
    :meth:`first_values` describe the newest network, the one the next commit goes to.
    :meth:`commit` validates a task completely before it changes anything, so a rejected commit
    leaves the store exactly as it was.
    """

    def __init__(
        self, layers: list[LayerSpec], b_max: int = 8, meta: dict[str, Any] | None = None
    ) -> None:
        if isinstance(b_max, bool) or not isinstance(b_max, int) or not 1 <= b_max <= WORD_BITS:
            raise StoreError(f"b_max must be an int in 1..{WORD_BITS}, got {b_max!r}")
        layers = list(layers)
        if not layers:
            raise StoreError("a packed store needs at least one prunable layer")
        for spec in layers:
            if not isinstance(spec, LayerSpec):
                raise StoreError(f"layers must be LayerSpec instances, got {type(spec).__name__}")
        names = [spec.name for spec in layers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise StoreError(f"duplicate layer names: {duplicates}")
        self._layers = tuple(layers)
        self._b_max = b_max
        self._meta = _normalise_meta(meta)
        self._nets = [_Network.empty(self._layers)]
        self._tasks: list[_Task] = []
        self._inputs: dict[int, dict[str, Any]] = {}
        self._recognise: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """The prunable layers, in the order given at construction."""
        return self._layers

    @property
    def b_max(self) -> int:
        """Largest allowed component width; fixes the availability rule."""
        return self._b_max

    @property
    def meta(self) -> dict[str, Any]:
        """The backbone description given at construction (a JSON-normalised copy)."""
        return json.loads(json.dumps(self._meta))

    @property
    def num_tasks(self) -> int:
        """Number of committed tasks; task ids are ``0 .. num_tasks-1``."""
        return len(self._tasks)

    def input_preparation(self, task: int) -> dict[str, Any] | None:
        """How task ``task``'s scenario turned a raw input into the network's input (a JSON
        document that :mod:`qpacknet.preparation` reads), or None where it was not recorded
        (files written before it was). Kept apart from the words: it never changes a logit."""
        self._task(task)
        doc = self._inputs.get(task)
        return None if doc is None else json.loads(json.dumps(doc))

    def set_input_preparation(self, task: int, doc: dict[str, Any]) -> None:
        """Record task ``task``'s input preparation; saved in the model file's header."""
        self._task(task)
        self._inputs[task] = _normalise_meta(doc, "an input preparation")

    @property
    def num_networks(self) -> int:
        """Networks opened so far (1 until :meth:`grow`); the newest takes the next commit."""
        return len(self._nets)

    def network_of(self, task: int) -> int:
        """The network whose words hold task ``task``."""
        return self._task(task).network

    def tasks_of(self, network: int) -> list[int]:
        """The tasks committed to ``network``, in order."""
        return [t for t, record in enumerate(self._tasks) if record.network == network]

    def grow(self) -> int:
        """Open a new network (fresh words, every weight available) for the next commits and
        return its index (DESIGN.md §2, ``capacity.when_full: grow``). Tasks already
        committed keep their networks' words untouched, so their functions stay frozen."""
        if not self._tasks or self._tasks[-1].network != len(self._nets) - 1:
            raise StoreError(
                f"network {len(self._nets) - 1} holds no task yet; commit one before growing"
            )
        self._nets.append(_Network.empty(self._layers))
        return len(self._nets) - 1

    @property
    def words(self) -> dict[str, torch.Tensor]:
        """The newest network's 32-bit words per layer (int64 values in ``[0, 2**32)``).
        Do not mutate."""
        return dict(self._nets[-1].words)

    @property
    def used_bits(self) -> dict[str, torch.Tensor]:
        """Bits already taken in each word of the newest network (int16). Do not mutate."""
        return dict(self._nets[-1].used)

    def available(self) -> dict[str, torch.Tensor]:
        """Weights of the newest network whose word still has room for a ``b_max``-bit
        component (DESIGN.md §2)."""
        return {name: u + self._b_max <= WORD_BITS for name, u in self._nets[-1].used.items()}

    def claimed(self) -> dict[str, torch.Tensor]:
        """Weights of the newest network some committed task owns: the ones a new task may
        share (DESIGN.md §2) and Υ counts (eqs. 6-7)."""
        return {name: used > 0 for name, used in self._nets[-1].used.items()}

    def first_values(self, network: int | None = None) -> dict[str, torch.Tensor]:
        """Per layer, the value of every claimed weight's first component in ``network`` (the
        newest by default; 0.0 elsewhere): what a task that shares the weight reads. Built from
        the tasks' decoded weights in commit order, so the earliest owner of each weight wins."""
        if network is not None and not 0 <= network < len(self._nets):
            raise StoreError(f"no network {network!r}: the store has {len(self._nets)}")
        net = self._nets[-1 if network is None else network]
        if net.first is not None:
            return dict(net.first)
        index = len(self._nets) - 1 if network is None else network
        values = {s.name: torch.zeros(s.shape, dtype=torch.float32) for s in self._layers}
        filled = {s.name: torch.zeros(s.shape, dtype=torch.bool) for s in self._layers}
        for t in self.tasks_of(index):
            own = self._decode_owned(t)
            for name, mask in self._tasks[t].masks.items():
                new = mask & ~filled[name]
                values[name][new] = own[name][new]
                filled[name] |= new
        net.first = values
        return dict(values)

    def _task(self, task: int) -> _Task:
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(self._tasks):
            raise StoreError(
                f"no task {task!r}: the store holds {len(self._tasks)} task(s), "
                f"ids 0..{len(self._tasks) - 1}"
            )
        return self._tasks[task]

    def _validate(
        self,
        masks: dict[str, torch.Tensor],
        codes: dict[str, torch.Tensor],
        codebooks: dict[str, torch.Tensor],
        widths: dict[str, int],
        task_state: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Check a commit completely; raise :class:`StoreError` on the first problem."""
        names = {s.name for s in self._layers}
        for what, given in (("masks", masks), ("codes", codes), ("codebooks", codebooks)):
            if not isinstance(given, dict):
                raise StoreError(f"{what} must be a dict keyed by layer name")
            if set(given) != names:
                raise StoreError(
                    f"{what} keys must equal the prunable layers: "
                    f"missing {sorted(names - set(given))}, unknown {sorted(set(given) - names)}"
                )
        available = self.available()
        for spec in self._layers:
            name = spec.name
            bit_width = widths[name]
            n_codes = 1 << bit_width
            mask, code, book = masks[name], codes[name], codebooks[name]
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise StoreError(f"layer {name!r}: mask must be a bool tensor")
            if tuple(mask.shape) != spec.shape:
                raise StoreError(
                    f"layer {name!r}: mask shape {tuple(mask.shape)} != layer shape {spec.shape}"
                )
            mask = mask.detach().cpu()
            owned = int(mask.sum())
            if not isinstance(code, torch.Tensor) or code.dim() != 1:
                raise StoreError(f"layer {name!r}: codes must be a 1-D tensor")
            if code.dtype.is_floating_point or code.dtype.is_complex or code.dtype == torch.bool:
                raise StoreError(f"layer {name!r}: codes must be integers, got {code.dtype}")
            if code.numel() != owned:
                raise StoreError(
                    f"layer {name!r}: {code.numel()} codes for {owned} masked weights "
                    "(one code per True mask entry, row-major)"
                )
            if owned:
                lo, hi = int(code.min()), int(code.max())
                if lo < 0 or hi >= n_codes:
                    raise StoreError(
                        f"layer {name!r}: codes out of range, they must lie in [0, {n_codes}) for "
                        f"{bit_width}-bit components, got min {lo}, max {hi}"
                    )
            if not isinstance(book, torch.Tensor) or book.dtype != torch.float32:
                raise StoreError(f"layer {name!r}: codebook must be a float32 tensor")
            if tuple(book.shape) != (n_codes,):
                raise StoreError(
                    f"layer {name!r}: codebook shape {tuple(book.shape)} != ({n_codes},) "
                    f"for bit_width {bit_width}"
                )
            if not bool(torch.isfinite(book).all()):
                raise StoreError(f"layer {name!r}: codebook holds NaN or infinite values")
            taken = int((mask & ~available[name]).sum())
            if taken:
                raise StoreError(
                    f"layer {name!r}: {taken} masked weight(s) are not available (their word "
                    f"has fewer than b_max={self._b_max} free bits); draw masks from available()"
                )
        if shared is not None:
            self._validate_shared(masks, shared)
        if not isinstance(task_state, dict):
            raise StoreError("task_state must be a dict of tensors")
        for key, value in task_state.items():
            if not isinstance(key, str) or not key:
                raise StoreError(f"task_state keys must be non-empty strings, got {key!r}")
            if not isinstance(value, torch.Tensor):
                raise StoreError(f"task_state[{key!r}] must be a tensor")

    def _validate_shared(
        self, masks: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]
    ) -> None:
        """Shared weights must be claimed by an earlier task and not owned by this one."""
        if not isinstance(shared, dict) or set(shared) != {s.name for s in self._layers}:
            raise StoreError("shared must be a dict of bool masks keyed by every prunable layer")
        claimed = self.claimed()
        for spec in self._layers:
            mask = shared[spec.name]
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise StoreError(f"layer {spec.name!r}: shared mask must be a bool tensor")
            if tuple(mask.shape) != spec.shape:
                raise StoreError(
                    f"layer {spec.name!r}: shared mask shape {tuple(mask.shape)} != layer "
                    f"shape {spec.shape}"
                )
            mask = mask.detach().cpu()
            both = int((mask & masks[spec.name].detach().cpu()).sum())
            if both:
                raise StoreError(
                    f"layer {spec.name!r}: {both} weight(s) are both owned and shared; a task "
                    "either owns a weight (a component) or reads it read-only, not both"
                )
            unclaimed = int((mask & ~claimed[spec.name]).sum())
            if unclaimed:
                raise StoreError(
                    f"layer {spec.name!r}: {unclaimed} shared weight(s) belong to no earlier "
                    "task; only claimed() weights can be shared"
                )

    def commit(
        self,
        masks: dict[str, torch.Tensor],
        codes: dict[str, torch.Tensor],
        codebooks: dict[str, torch.Tensor],
        bit_width: int | Mapping[str, int],
        task_state: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor] | None = None,
    ) -> int:
        """Pack a quantised task into the words and return its id (DESIGN.md §2, COMMIT).

        ``masks[name]`` has the layer's shape; ``codes[name]`` holds one code per True mask entry
        in row-major order; ``bit_width`` is one width for every layer or, per-layer bit widths
        (issue 13, the paper's "hybrid quantisation"), a width per layer, each in 1..b_max, so
        the availability rule (``used + b_max <= 32``) still bounds every word;
        ``codebooks[name]`` is float32 of length ``2**width`` of its layer;
        ``task_state`` holds the task's unpacked tensors (head, normalisation state), stored as
        CPU clones. The task goes into the newest network (:meth:`grow`). Each code goes to bit
        offset ``used_bits`` of its word, then ``used_bits`` grows by its layer's width. ``shared``
        (weight sharing) marks weights of the network's earlier tasks the task reads without
        owning them; they take no bits. Everything is validated first and the new words are
        built aside, so a :class:`StoreError` leaves the store unchanged.
        """
        widths = self._widths(bit_width)
        self._validate(masks, codes, codebooks, widths, task_state, shared)
        net = self._nets[-1]
        if shared is not None and not any(bool(m.any()) for m in shared.values()):
            shared = None
        new_words: dict[str, torch.Tensor] = {}
        new_used: dict[str, torch.Tensor] = {}
        task_masks: dict[str, torch.Tensor] = {}
        offsets: dict[str, torch.Tensor] = {}
        for spec in self._layers:
            name = spec.name
            mask = masks[name].detach().cpu().clone()
            index = mask.reshape(-1).nonzero().squeeze(1)
            used = net.used[name].reshape(-1)
            offset = used[index].clone()
            words = net.words[name].reshape(-1).clone()
            code = codes[name].detach().cpu().to(torch.int64)
            words[index] |= code << offset.to(torch.int64)
            used = used.clone()
            used[index] += widths[name]
            new_words[name] = words.view(spec.shape)
            new_used[name] = used.view(spec.shape)
            task_masks[name] = mask
            offsets[name] = offset
        task = _Task(
            widths=widths,
            masks=task_masks,
            offsets=offsets,
            codebooks={n: codebooks[n].detach().cpu().clone() for n in task_masks},
            state={k: v.detach().cpu().clone() for k, v in task_state.items()},
            shared=(
                None
                if shared is None
                else {n: shared[n].detach().cpu().clone() for n in task_masks}
            ),
            network=len(self._nets) - 1,
        )
        net.words.update(new_words)
        net.used.update(new_used)
        self._tasks.append(task)
        net.first = None
        return len(self._tasks) - 1

    def _read_codes(self, record: _Task, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices of the task's owned weights in layer ``name`` and their codes (int64)."""
        index = record.masks[name].reshape(-1).nonzero().squeeze(1)
        words = self._nets[record.network].words[name].reshape(-1)[index]
        low = (1 << record.widths[name]) - 1
        return index, (words >> record.offsets[name].to(torch.int64)) & low

    def codes(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s codes per layer (int64, row-major mask order), read from the words."""
        record = self._task(task)
        return {s.name: self._read_codes(record, s.name)[1] for s in self._layers}

    def decode(self, task: int) -> dict[str, torch.Tensor]:
        """Dense float32 weights of ``task``: ``codebook[code]`` where masked, 0.0 elsewhere.

        Codes are read back from the words (shift and mask), so any damage to the words shows in
        the decoded weights. The result is cached per task until :meth:`clear_cache`; the
        returned tensors ARE the cached ones, so callers must not modify them in place.
        Shared weights (weight sharing) hold their first component's value, read the same way.
        """
        record = self._task(task)
        if record.decoded is None:
            decoded = self._decode_owned(task)
            if record.shared is not None:
                first = self.first_values(record.network)
                decoded = {n: v.clone() for n, v in decoded.items()}
                for name, mask in record.shared.items():
                    decoded[name][mask] = first[name][mask]
            record.decoded = decoded
        return dict(record.decoded)

    def _decode_owned(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s owned weights only, ``codebook[code]`` read from the words; cached
        with :meth:`decode`'s result (the same tensors when the task shares nothing)."""
        record = self._tasks[task]
        if record.owned is None:
            owned = {}
            for spec in self._layers:
                index, code = self._read_codes(record, spec.name)
                dense = torch.zeros(spec.numel, dtype=torch.float32)
                dense[index] = record.codebooks[spec.name][code]
                owned[spec.name] = dense.view(spec.shape)
            record.owned = owned
        return dict(record.owned)

    def clear_cache(self) -> None:
        """Drop every task's cached decoded weights."""
        for net in self._nets:
            net.first = None
        for record in self._tasks:
            record.decoded = None
            record.owned = None

    def mask(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s owned-weight mask per layer (a copy)."""
        return {n: m.clone() for n, m in self._task(task).masks.items()}

    def shared(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s shared-weight mask per layer (all False without weight sharing)."""
        record = self._task(task)
        if record.shared is None:
            return {s.name: torch.zeros(s.shape, dtype=torch.bool) for s in self._layers}
        return {n: m.clone() for n, m in record.shared.items()}

    def uses(self, task: int) -> dict[str, torch.Tensor]:
        """Every weight task ``task``'s function reads: owned or shared."""
        shared = self.shared(task)
        return {n: m | shared[n] for n, m in self._task(task).masks.items()}

    def bit_width(self, task: int) -> int:
        """Component width ``b_t`` of task ``task``: its widest layer's with per-layer widths."""
        return self._task(task).bit_width

    def bit_widths(self, task: int) -> dict[str, int]:
        """Task ``task``'s component width per layer (all ``b_t`` unless it has per-layer
        widths)."""
        return dict(self._task(task).widths)

    def _widths(self, bit_width: int | Mapping[str, int]) -> dict[str, int]:
        """``bit_width`` as a width per layer, each checked to be an int in 1..b_max."""
        names = [s.name for s in self._layers]
        if isinstance(bit_width, Mapping):
            if set(bit_width) != set(names):
                raise StoreError(
                    f"bit widths must name every prunable layer: missing "
                    f"{sorted(set(names) - set(bit_width))}, unknown "
                    f"{sorted(set(bit_width) - set(names))}"
                )
            widths = {n: bit_width[n] for n in names}
        else:
            widths = dict.fromkeys(names, bit_width)
        for name, width in widths.items():
            if isinstance(width, bool) or not isinstance(width, int):
                raise StoreError(f"bit_width must be an int, got {width!r} for layer {name!r}")
            if not 1 <= width <= self._b_max:
                raise StoreError(
                    f"bit_width {width} is outside 1..b_max={self._b_max} (layer {name!r})"
                )
        return widths

    def codebooks(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s float32 codebooks per layer (copies)."""
        return {n: b.clone() for n, b in self._task(task).codebooks.items()}

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s unpacked tensors (head, normalisation state), as copies."""
        return {k: v.clone() for k, v in self._task(task).state.items()}

    def parts(self, task: int) -> TaskParts:
        """What the store holds for ``task``, with its codes read back from the words.

        DESIGN.md §2 COMMIT: the driver checks a commit bit for bit by comparing
        ``parts(t).digest()`` with the worker's digest of what it quantised; reading the codes
        from the words (not a side copy) makes a packing bug or damaged words show. Masks,
        codebooks and task state are copies of the task's records; ``shared`` is None for a task
        that shares nothing.
        """
        record = self._task(task)
        uniform = len(set(record.widths.values())) == 1
        return TaskParts(
            bit_width=record.bit_width if uniform else dict(record.widths),
            masks=self.mask(task),
            codes=self.codes(task),
            codebooks=self.codebooks(task),
            task_state=self.task_state(task),
            shared=None if record.shared is None else self.shared(task),
        )

    def density(self, task: int) -> dict[str, float]:
        """Fraction ``d_tl`` of each layer's weights that task ``task`` owns (eq. 10's 1-Υ_l)."""
        record = self._task(task)
        return {s.name: int(record.masks[s.name].sum()) / s.numel for s in self._layers}

    # task recognition --------------------------------------------------------------------------

    def recognition_stats(self, task: int) -> dict[str, torch.Tensor] | None:
        """Task ``task``'s task-recognition statistics (:mod:`qpacknet.recognise`: summaries of
        its training split, computed at COMMIT), copies, or None where none were recorded
        (files written before they were). Kept apart from the words: they never change a
        logit, only which task an input without a task id is given to."""
        self._task(task)
        stats = self._recognise.get(task)
        return None if stats is None else {k: v.clone() for k, v in stats.items()}

    def set_recognition_stats(self, task: int, stats: dict[str, torch.Tensor]) -> None:
        """Record task ``task``'s recognition statistics (float32 CPU copies); saved in the
        model file under its checksums."""
        from qpacknet.recognise import check_stats

        self._task(task)
        problem = check_stats(stats) if isinstance(stats, dict) else "not a dict of tensors"
        if problem:
            raise StoreError(f"task {task}: recognition statistics: {problem}")
        self._recognise[task] = {k: v.detach().cpu().clone() for k, v in stats.items()}
