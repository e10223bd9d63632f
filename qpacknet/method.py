"""Ada-QPacknet, one task at a time: the method in one file.

Every task passes four stages (DESIGN.md §2). This module holds what each stage computes, as
plain functions over a population network (:mod:`qpacknet.nets`), the task's splits, the
training loop (:mod:`qpacknet.train`) and the packed store (:mod:`qpacknet.store`). Which
process runs a stage (:mod:`qpacknet.worker`, :mod:`qpacknet.executor`), the events it
emits, checkpoints and MLflow live elsewhere and call these functions.

1. SEARCH (Algorithm 1): :func:`draw_candidates` gives ``P_S`` candidates random masks under
   the availability rule and fresh Xavier weights, :func:`train_short` trains them ``E_short``
   epochs as one population, :func:`score_candidates` measures Υ (eqs. 6-7) and
   :func:`choose_winner` keeps the best eq. 8 score.
2. TRAIN: :func:`train_winner` continues the winner ``E_full`` epochs with the cosine schedule
   and keeps its best validation epoch; that accuracy is Algorithm 3's ``Q``.
3. QUANTIZE (Algorithms 2-3): :func:`quantize_winner` tries ψ = ψ_min … b_max, each a 1-D
   k-means codebook per layer (Algorithm 2), and keeps the first width the criterion accepts;
   optionally each width's codebooks (and with them the task's head) are fine-tuned first and
   each layer then gets its own width (issue 13: ``quantize.finetune_epochs``,
   ``quantize.finetune_head``, ``quantize.per_layer``).
4. COMMIT: :func:`commit` writes the codes into the next free bits of the words and proves,
   by digest, that the words hold exactly what QUANTIZE produced.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from qpacknet.codebook_tuning import tune_codebooks
from qpacknet.config import RunConfig
from qpacknet.errors import CommitRefused
from qpacknet.nets import PopulationNet
from qpacknet.quantize import (
    Codebook,
    Criterion,
    QuantResult,
    Tune,
    ValFigures,
    Widths,
    bit_width_steps,
    describe_widths,
    val_figures,
)
from qpacknet.scenarios.base import Split
from qpacknet.search import (
    CandidateResult,
    draw_mask,
    draw_shared,
    scores,
    select_winner,
    weighted_sparsity,
)
from qpacknet.store import PackedStore
from qpacknet.store.digest import task_digest
from qpacknet.train import EpochReport, fit_epochs, logits_of

Masks = dict[str, torch.Tensor]

REVISION = 2
"""Bumped when a stage computes something else for the same settings, so that a run resumed
from an older checkpoint can say so (2: Υ over every task's weights, eqs. 6-7)."""

# --- 1. SEARCH (Algorithm 1) -------------------------------------------------------------


def draw_candidates(
    net: PopulationNet,
    available: Masks,
    cfg: RunConfig,
    task: int,
    candidates: list[int],
    claimed: Masks | None = None,
    frozen: Masks | None = None,
) -> list[Masks]:
    """Algorithm 1's start: per candidate and layer a sparsity ``s ~ U[V_min, V_max]`` and
    that many weights drawn among the available ones (:func:`~qpacknet.search.draw_mask`),
    then fresh Xavier weights. With ``claimed`` and ``frozen`` (weight sharing, TinySubNets)
    each candidate also reads a random part of the earlier tasks' frozen weights. Returns the
    masks (CPU); everything depends only on (seed, task, candidate, store)."""
    masks = [
        draw_mask(net.layer_specs, available, cfg.search, cfg.seed, task, c) for c in candidates
    ]
    net.init_candidates(cfg.seed, task, candidates)
    device = next(net.parameters()).device
    net.set_masks([{k: v.to(device) for k, v in m.items()} for m in masks])
    if claimed is not None and frozen is not None:
        shared = [
            draw_shared(net.layer_specs, claimed, m, cfg.sharing, cfg.seed, task, c)
            for c, m in zip(candidates, masks, strict=True)
        ]
        net.set_sharing(frozen, shared)
    return masks


def train_short(
    net: PopulationNet, train: Split, val: Split, cfg: RunConfig, task: int
) -> Generator[EpochReport, None, list[float]]:
    """Algorithm 1's training: ``E_short`` epochs of every candidate at once, constant learning
    rate; returns each candidate's validation accuracy ``A_i`` after the last epoch."""
    return fit_epochs(
        net,
        train,
        val,
        cfg.train,
        seed=cfg.seed,
        task=task,
        stage="search",
        epochs=cfg.search.epochs,
        schedule=False,
        keep_best=False,
    )


def score_candidates(
    net: PopulationNet,
    candidates: list[int],
    accs: list[float],
    masks: list[Masks],
    claimed: Masks | None,
) -> list[CandidateResult]:
    """What a candidate reports: ``A_i``, Υ_i over every task's assignment in the network
    (eqs. 6-7: the weights no task would own if it were committed; ``claimed``), its density
    per layer and the share of the weights it reads from earlier tasks."""
    return [
        CandidateResult(
            index=c,
            acc=acc,
            sparsity=weighted_sparsity(m, claimed),
            density={k: float(v.float().mean()) for k, v in m.items()},
            shared=_shared_fraction(net, i),
        )
        for i, (c, acc, m) in enumerate(zip(candidates, accs, masks, strict=True))
    ]


def _shared_fraction(net: PopulationNet, i: int) -> float:
    shared = net.shared_mask(i)
    if shared is None:
        return 0.0
    return sum(int(m.sum()) for m in shared.values()) / net.num_prunable()


def choose_winner(results: list[CandidateResult], cfg: RunConfig) -> tuple[int, list[float]]:
    """Eq. 8: ``α·A_i/max(A) + β·Υ_i/max(Υ)`` for every candidate (in index order) and the
    index of the best, ties to the lower index."""
    ordered = sorted(results, key=lambda r: r.index)
    alpha, beta = cfg.search.alpha, cfg.search.beta
    return select_winner(ordered, alpha, beta), scores(ordered, alpha, beta)


# --- 2. TRAIN ------------------------------------------------------------------------------


def train_winner(
    single: PopulationNet, train: Split, val: Split, cfg: RunConfig, task: int
) -> Generator[EpochReport, None, list[float]]:
    """Continue the winner (a K=1 net holding its short-trained state) for ``E_full`` epochs
    with the cosine schedule, ending with the weights of its best validation epoch; returns
    that accuracy, Algorithm 3's ``Q``."""
    return fit_epochs(
        single,
        train,
        val,
        cfg.train,
        seed=cfg.seed,
        task=task,
        stage="train",
        epochs=cfg.train.epochs,
        schedule=True,
        keep_best=True,
    )


# --- 3. QUANTIZE (Algorithms 2-3) ------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedTask:
    """Everything COMMIT writes into the store, plus the bit-width search's report.

    ``within_delta``: ``criterion`` accepted ``bit_width`` (False: no width was accepted and
    ``b_max`` was used). ``layer_bits`` is the width per layer (``bit_width``, the widest, for
    every layer unless ``quantize.per_layer`` lowered some). ``tried`` holds ``(widest bits,
    val acc, val loss, agreement, allowed acc drop)`` per assignment tried and
    ``tried_widths`` its per-layer widths; ``float_*``, ``quant_*`` and ``agreement`` are the
    float network's and the chosen width's validation figures. ``float_test_acc`` is the float
    network's test accuracy, for reports only. None of these is part of the digest
    (``parts_digest``): COMMIT checks what it writes, not what was measured.
    """

    candidate: int
    bit_width: int
    masks: Masks
    codes: dict[str, torch.Tensor]
    codebooks: dict[str, torch.Tensor]
    task_state: dict[str, torch.Tensor]
    float_acc: float
    quant_acc: float
    within_delta: bool
    tried: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    shared: Masks | None = None
    digest: str = ""
    criterion: str = "accuracy"
    float_loss: float = math.nan
    quant_loss: float = math.nan
    agreement: float = math.nan
    float_test_acc: float = math.nan
    layer_bits: dict[str, int] = field(default_factory=dict)
    tried_widths: list[dict[str, int]] = field(default_factory=list)
    finetune_epochs: int = 0
    finetune_head: bool = False

    @property
    def widths(self) -> dict[str, int]:
        """The width per layer COMMIT writes."""
        return dict(self.layer_bits) or dict.fromkeys(self.masks, self.bit_width)

    def parts_digest(self) -> str:
        """The digest of what this result asks COMMIT to write (recomputed, not ``digest``)."""
        return task_digest(
            self.widths, self.masks, self.codes, self.codebooks, self.task_state, self.shared
        )


def quantize_winner(
    single: PopulationNet,
    probe: PopulationNet,
    val: Split,
    cfg: RunConfig,
    candidate: int,
    q_float: float,
    *,
    train: Split | None,
    task: int,
) -> Generator[tuple[str, ValFigures, str], None, QuantizedTask]:
    """Algorithm 3 on the trained winner ``single``: for ψ = ψ_min … b_max quantise every
    layer's owned weights to a ``2^ψ``-centroid k-means codebook (Algorithm 2), load them into
    ``probe`` (a K=1 net with the winner's shared weights) and measure the validation figures;
    the first ψ that ``quantize.criterion`` accepts against the float network's (whose accuracy
    is ``q_float``, TRAIN's ``Q``) is ``b_t``, else ``b_max``. With ``quantize.finetune_epochs``
    each width's codebooks are first fine-tuned on ``train``
    (:mod:`qpacknet.codebook_tuning`); with ``quantize.per_layer`` each layer's width is then
    lowered on its own (:func:`~qpacknet.quantize.bit_width_steps`). Yields ``(widths, figures,
    what the criterion saw)`` per assignment; returns the parts COMMIT writes for winner
    ``candidate``, with their digest. Only validation figures choose; ``train`` only trains."""
    weights, masks, state = single.candidate(0)
    batch = cfg.train.eval_batch_size
    logits = logits_of(single, val, batch)[0]
    float_pred = logits.argmax(-1)
    reference = dataclasses.replace(val_figures(logits, val.y, float_pred), acc=q_float)
    q = cfg.quantize

    # With finetune_head each tuned codebook set has its own head: ``judging`` is the one the
    # next ``figures`` call judges, ``heads`` maps each set (by identity) to its head.
    judging = state
    heads: list[tuple[dict[str, Codebook], dict[str, torch.Tensor]]] = []

    def figures(dense: Masks) -> ValFigures:
        probe.load_candidate(0, dense, masks, judging)
        return val_figures(logits_of(probe, val, batch)[0], val.y, float_pred)

    tune: Tune | None = None
    if q.finetune_epochs:
        if train is None:
            raise ValueError("codebook fine-tuning (finetune_epochs) needs the train split")
        split = train
        targets = logits_of(single, split, batch)[0] if q.finetune_target == "float" else None

        def tune_split(books: dict[str, Codebook]) -> dict[str, Codebook]:
            nonlocal judging
            tuned, judging = tune_codebooks(
                probe,
                books,
                masks,
                state,
                split,
                epochs=q.finetune_epochs,
                lr=q.finetune_lr,
                batch_size=cfg.train.batch_size,
                seed=cfg.seed,
                task=task,
                targets=targets,
                head=q.finetune_head,
            )
            heads.append((tuned, judging))
            return tuned

        tune = tune_split

    criterion = Criterion(q.criterion, q.delta, q.loss_tolerance, q.min_agreement, q.delta_se)
    steps = bit_width_steps(
        weights,
        masks,
        figures,
        reference,
        q.psi_min,
        q.b_max,
        criterion,
        q.kmeans_iters,
        per_layer=q.per_layer,
        tune=tune,
    )
    while True:
        try:
            widths, fig = next(steps)
        except StopIteration as stop:
            res: QuantResult = stop.value
            break
        yield describe_widths(widths), fig, criterion.describe(reference, fig)
    shared = single.shared_mask(0)
    committed = next((h for books, h in heads if books is res.codebooks), state)
    result = QuantizedTask(
        candidate=candidate,
        bit_width=res.bits,
        masks={k: v.cpu() for k, v in masks.items()},
        codes={k: b.codes.cpu() for k, b in res.codebooks.items()},
        codebooks={k: b.centroids.cpu() for k, b in res.codebooks.items()},
        task_state={k: v.cpu() for k, v in committed.items()},
        float_acc=res.float_acc,
        quant_acc=res.quant_acc,
        within_delta=res.within_delta,
        tried=[(b, f.acc, f.loss, f.agreement, criterion.allowed_drop(f)) for b, f in res.tried],
        tried_widths=res.tried_widths,
        layer_bits=_layer_bits(res.widths),
        finetune_epochs=q.finetune_epochs,
        finetune_head=q.finetune_head,
        shared=None if shared is None else {k: v.cpu() for k, v in shared.items()},
        criterion=q.criterion,
        float_loss=res.reference.loss,
        quant_loss=res.quant.loss,
        agreement=res.quant.agreement,
    )
    return dataclasses.replace(result, digest=result.parts_digest())


def _layer_bits(widths: Widths) -> dict[str, int]:
    """Per-layer widths worth recording: empty when every layer has the same width."""
    return dict(widths) if len(set(widths.values())) > 1 else {}


# --- 4. COMMIT ---------------------------------------------------------------------------------


def commit(store: PackedStore, q: QuantizedTask, what: str, unchanged: str) -> int:
    """Write ``q`` into the store's newest network (each code at its word's next free bit
    offset, DESIGN.md §2 COMMIT) and return the task id. Checked bit for bit, never by
    comparing floats from another process: what arrived must hash to the digest the worker
    took, and the words must read back as the same digest. ``what`` names the task and
    ``unchanged`` what stays untouched in the messages of :class:`CommitRefused`."""
    received = q.parts_digest()
    if received != q.digest:
        raise CommitRefused(
            f"{what}: COMMIT refused: the quantised task that reached the driver "
            f"(digest {received[:16]}) is not what the worker quantised (digest "
            f"{q.digest[:16]}); its codes, codebooks, masks or state changed on the way. "
            f"Nothing was committed and {unchanged} is unchanged; resume the run "
            "(same command) to learn this task again"
        )
    task_id = store.commit(q.masks, q.codes, q.codebooks, q.widths, q.task_state, q.shared)
    stored = store.parts(task_id).digest()
    if stored != q.digest:
        raise CommitRefused(
            f"{what}: COMMIT refused: the packed words read back as digest {stored[:16]}, not "
            f"the quantised task's {q.digest[:16]} (a packing bug); {unchanged} is unchanged"
        )
    return task_id
