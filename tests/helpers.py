"""Test helpers shared by several test files: the checks that the population, pipeline and
user-stream tests make in the same way, kept in one place so that they stay the same checks.

Fixtures and the tiny streams live in ``conftest.py``; these are plain functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qpacknet.cli import main
from qpacknet.config import RunConfig, TrainConfig
from qpacknet.executor import LocalExecutor, drive
from qpacknet.layerspec import LayerSpec
from qpacknet.model import PackedModel
from qpacknet.nets import PopulationNet, build
from qpacknet.pipeline import MODEL_FILE, Pipeline
from qpacknet.progress import Progress
from qpacknet.scenarios.base import Split, TaskStream
from qpacknet.scenarios.digits import PermutedDigits
from qpacknet.train import EpochReport, fit
from qpacknet.worker import CandidateWorker, TaskContext
from tests.conftest import tiny_config


def all_available(specs: list[LayerSpec]) -> dict[str, torch.Tensor]:
    """Every weight of every prunable layer available, as on an empty store."""
    return {s.name: torch.ones(s.shape, dtype=torch.bool) for s in specs}


def fit_first_task(
    net: PopulationNet,
    stream: TaskStream,
    dtype: torch.dtype,
    cfg: TrainConfig,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> list[float]:
    """Train ``net`` for ``cfg.epochs`` on task 0 (cast to ``dtype``) with the schedule and
    best-epoch selection, under one fixed seed: the training that the "population equals
    separate trainings" tests run once as a population and once per candidate."""
    task = stream.task(0)

    def cast(s: Split) -> Split:
        return Split(s.x.to(dtype), s.y)

    return fit(
        net,
        cast(task.train),
        cast(task.val),
        cfg,
        seed=1,
        task=0,
        stage="t",
        epochs=cfg.epochs,
        schedule=True,
        keep_best=True,
        on_epoch=on_epoch,
    )


def assert_same_candidate(
    pop: PopulationNet,
    slot: int,
    single: PopulationNet,
    atol: float,
    state_rtol: float = 0.0,
) -> None:
    """Slot ``slot`` of ``pop`` equals the lone candidate of ``single``: the same masks (exactly),
    weights within ``atol``, and the same task state (heads, norm statistics) within
    ``atol``/``state_rtol``."""
    wp, mp, sp = pop.candidate(slot)
    ws, ms, ss = single.candidate(0)
    assert set(sp) == set(ss) == set(single.task_param_names)
    for key in wp:
        assert torch.equal(mp[key], ms[key]), key
        torch.testing.assert_close(wp[key], ws[key], atol=atol, rtol=0)
    for key in sp:
        torch.testing.assert_close(sp[key], ss[key], atol=atol, rtol=state_rtol)


def search_results(
    cfg: RunConfig,
    stream: TaskStream,
    available: dict[str, torch.Tensor],
) -> list[tuple[int, float, float]]:
    """``(index, accuracy, sparsity)`` of every candidate of task 0's SEARCH on the local
    executor: what must not depend on how candidates are chunked."""
    ex = LocalExecutor()
    ctx = TaskContext(cfg, 0, stream.input_shape, stream.num_classes, available)
    ex.begin_run(stream, cfg)
    ex.begin_task(ctx, stream)
    return [(r.index, r.acc, r.sparsity) for r in ex.search()]


def local_pipeline(out: Path, stream: TaskStream, **over: dict) -> Pipeline:
    """A quiet pipeline on the local executor under ``tiny_config(**over)``."""
    return Pipeline(tiny_config(**over), stream, LocalExecutor(), out, Progress(verbose=False))


def learn_checking_old_logits(
    pipe: Pipeline, probe: torch.Tensor, label: str = ""
) -> list[torch.Tensor]:
    """Learn every task of ``pipe``'s stream one by one; after each commit the reloaded model
    file holds one more task and every earlier task's logits on ``probe`` are bit-identical to
    those recorded when it was committed (DESIGN.md §2, COMMIT). Returns the recorded logits."""
    path = pipe.out_dir / MODEL_FILE
    recorded: list[torch.Tensor] = []
    for t in range(pipe.stream.num_tasks):
        pipe.learn_task(t)
        model = PackedModel.load(path)
        assert model.num_tasks == t + 1
        recorded.append(model.logits(t, probe))
        for j in range(t + 1):
            again = PackedModel.load(path).logits(j, probe)
            assert torch.equal(again, recorded[j]), f"{label}task {j} changed after task {t}"
    return recorded


def learn_one_more_task(
    run_dir: Path,
    model_name: str,
    out: Path,
    stream: TaskStream,
    capsys: pytest.CaptureFixture[str],
) -> PackedModel:
    """``qpacknet learn`` from the registered model of the run in ``run_dir`` (its local sqlite
    store) into ``out``: it registers the next version, the model holds one more task, and the
    earlier tasks' logits on their test splits from ``stream`` are bit-identical."""
    before = PackedModel.load(run_dir / MODEL_FILE)
    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    learn = ["learn", "--model", f"models:/{model_name}/latest", "--tracking-uri", uri]
    capsys.readouterr()
    rc = main([*learn, "--out", str(out), "--executor", "local", "--quiet"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    assert f"versions {before.num_tasks + 1}" in printed, printed[-2000:]
    after = PackedModel.load(out / MODEL_FILE)
    assert after.num_tasks == before.num_tasks + 1
    for j in range(before.num_tasks):
        split = stream.test_split(j)
        assert torch.equal(after.split_logits(j, split), before.split_logits(j, split)), j
    return after


@functools.cache
def _trained_digits() -> tuple[CandidateWorker, PermutedDigits]:
    stream = PermutedDigits(num_tasks=1, seed=3)
    cfg = tiny_config(quantize={"criterion": "accuracy", "delta": 0.5})
    specs = build(cfg.net, stream.input_shape, stream.num_classes, 1).layer_specs
    ctx = TaskContext(cfg, 0, stream.input_shape, stream.num_classes, all_available(specs))
    worker = CandidateWorker(ctx, *stream.fit_splits(0))
    drive(worker.search([0, 1]), None)
    drive(worker.train(1), None)
    return worker, stream


def trained_digits_worker(**quantize: object) -> tuple[CandidateWorker, PermutedDigits]:
    """A worker holding the trained winner of one small digits task (trained once per test
    process), with ``quantize`` settings over the paper's test with δ = 0.5: QUANTIZE reads
    the config only when it runs, so every test quantises the same float network."""
    worker, stream = _trained_digits()
    base = worker.ctx.config
    worker.cfg = base.model_copy(update={"quantize": base.quantize.model_copy(update=quantize)})
    return worker, stream
