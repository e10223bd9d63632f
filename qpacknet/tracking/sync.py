"""``qpacknet sync``: bring a run directory's MLflow record up to date.

A tracking server that fails mid-run turns tracking off for the rest of the run (training goes
on), which leaves the record with a hole. Everything the record holds is on disk: the
checkpoint's task reports (candidates with their SEARCH epochs and chunk times, the winner's
TRAIN epochs, bits tried, commit time), the accuracy matrix, the model (whose first T tasks are
the model after task T, bit for bit) and ``results.json`` once the run ended. So the missing
parent run, task runs, candidate runs, metrics, artifacts and model versions are added here,
each looked up first (by the parent run recorded in ``mlflow.json`` or tagged with the run
directory, task and candidate tags, version tags) so that nothing is written twice; metrics
carry the run's own timestamps, which MLflow's SQL store does not duplicate. A resumed run calls
this for its earlier tasks on its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpacknet.config import TrackingConfig, flatten, validate
from qpacknet.errors import UsageError
from qpacknet.layout import CHECKPOINT_FILE, RESULTS_FILE
from qpacknet.tracking import record, writer
from qpacknet.tracking.client import SafeTracking
from qpacknet.tracking.registry import Lineage, RegistryConflict, parent_of

log = logging.getLogger("qpacknet.tracking")
SYNC_COMMAND = "qpacknet run (recorded afterwards by qpacknet sync)"
LEARN_COMMAND = "qpacknet learn (recorded afterwards by qpacknet sync)"


class TrackingUnavailable(UsageError):
    """The tracking server failed during ``sync`` (exit 2; run it again later)."""


@dataclass
class SyncReport:
    """What one sync found and added."""

    run_id: str | None = None
    task_runs: dict[int, str] = field(default_factory=dict)
    versions: dict[int, str] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.added:
            return "nothing was missing"
        counts: dict[str, int] = {}
        for item in self.added:
            counts[item] = counts.get(item, 0) + 1
        return "added " + ", ".join(f"{what} ×{n}" for what, n in counts.items())


class RecordSync:
    """Compares a run directory with its MLflow record and adds what is missing."""

    def __init__(self, safe: SafeTracking, out_dir: Path, cfg: TrackingConfig) -> None:
        self.safe = safe
        self.client = safe.client
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        state = json.loads((self.out_dir / CHECKPOINT_FILE).read_text())
        self.state = state
        self.tasks: list[dict[str, Any]] = state["tasks"]
        self.matrix: list[list[float]] = state["matrix"]
        self.workers: dict[str, Any] = state.get("workers", {})
        self.config = validate(state["config"])
        results = self.out_dir / RESULTS_FILE
        self.results = json.loads(results.read_text()) if results.exists() else None
        if self.results is not None and len(self.results["tasks"]) != len(self.tasks):
            self.results = None  # a later resume has added tasks: the run has not ended
        source = self.results or state
        self.scenario = str(source.get("scenario") or self.config.scenario.name)
        self.preset = source.get("preset")
        self.executor = str(source.get("executor") or self.config.executor.kind)
        from qpacknet.tracking.tracker import learned_lineage

        self.lineage = learned_lineage(self.out_dir)
        self.run_name = ""
        self.run_id = ""
        self._found: list[Any] = []
        self.command = LEARN_COMMAND if state.get("learned_from") else SYNC_COMMAND

    # ------------------------------------------------------------------ entry
    def sync(
        self,
        experiment_id: str | None = None,
        run_id: str | None = None,
        upto: int | None = None,
        lineage: Lineage | None = None,
        saved: dict[str, Any] | None = None,
        known: dict[str, Any] | None = None,
    ) -> SyncReport:
        """Add what is missing of tasks ``0..upto-1`` (all committed tasks by default) and,
        when the run has ended, of the parent run's end. ``saved`` is ``mlflow.json`` (the
        run, its task runs and versions as the live tracker recorded them); ``known``: task
        runs and versions the caller already holds."""
        out = SyncReport()
        saved = saved or {}
        known = known or saved
        lineage = lineage or self.lineage
        first = lineage.first_task if lineage is not None else 0
        exp = experiment_id or self._experiment()
        if exp is None:
            return out
        run_id = run_id or self._parent(exp, saved.get("run_id"), out, first)
        out.run_id = run_id
        if run_id is None:
            return out
        self.run_id = run_id
        parent_run = self.safe.call("reading the run", self.client.get_run, run_id)
        if parent_run is None:
            return out
        self.run_name = parent_run.info.run_name
        self.command = parent_run.data.tags.get("qpacknet.command", self.command)
        n = len(self.tasks) if upto is None else min(upto, len(self.tasks))
        existing = self._children(exp, run_id, "qpacknet.task")
        by_id = {r.info.run_id: r for r in self._found}
        recorded = int_keys(known.get("task_runs"), "task_runs")
        versions = {
            **int_keys(known.get("model_versions"), "model_versions"),
            **self._versions(run_id),
        }
        for t in range(first, n):  # a learn's run records only the tasks it learned
            if self.safe.broken:
                break
            run = by_id.get(recorded.get(t, "")) or existing.get(record.task_label(t))
            task_run = self._task(exp, run_id, t, run, out)
            if task_run is None:
                break
            out.task_runs[t] = task_run
            if self.cfg.register_models:
                parent, guard = parent_of(
                    t, lineage, {**versions, **out.versions}, str(self.out_dir)
                )
                version = versions.get(t) or self._version(t, task_run, parent, guard, exp, out)
                if version is not None:
                    out.versions[t] = version
            self.safe.call(
                "closing a task run",
                self.client.set_terminated,
                task_run,
                "FINISHED",
                end_time=record.commit_ms(self.tasks[t]),
            )
        if upto is None and self.results is not None and not self.safe.broken:
            run = self.safe.call("reading the run", self.client.get_run, run_id)
            if run is not None and (
                run.info.status != "FINISHED" or "packed_bytes" not in run.data.metrics
            ):
                writer.end_run(self.safe, run_id, self.results, self.out_dir, self.preset)
                out.added.append("run end (final metrics, files, plots)")
        return out

    # ------------------------------------------------------------- the parent
    def _experiment(self) -> str | None:
        exp = self.safe.call(
            "looking up the experiment", self.client.get_experiment_by_name, self.cfg.experiment
        )
        if exp is not None:
            return str(exp.experiment_id)
        return self.safe.call(
            "creating the experiment",
            self.client.create_experiment,
            self.cfg.experiment,
            tags={"mlflow.note.content": record.EXPERIMENT_NOTE},
        )

    def _parent(self, exp: str, known: str | None, out: SyncReport, first: int) -> str | None:
        if known:
            if self.safe.lookup("reading the run", self.client.get_run, known) is not None:
                return known
            if self.safe.broken:  # reported once by lookup; sync_run_dir then exits 2
                return None
            # else that store lost it (or it is another store): look it up by its tags
        where = str(self.out_dir.resolve()).replace("'", "\\'")
        found = self.safe.call(
            "looking up the run",
            self.client.search_runs,
            [exp],
            filter_string=f"tags.`qpacknet.out_dir` = '{where}'",
            max_results=50,
        )
        parents = [r for r in found or [] if "mlflow.parentRunId" not in r.data.tags]
        if parents:
            return str(parents[0].info.run_id)
        if self.safe.broken:
            return None
        cfg = self.config
        device = self.results.get("evaluation", {}).get("device", "") if self.results else ""
        tags = record.run_tags(
            self.preset,
            self.scenario,
            cfg.seed,
            self.executor,
            str(device or cfg.device),
            where,
            self.command,
            {},
        )
        started = self.tasks[first].get("started_at") if len(self.tasks) > first else None
        name = record.run_name(self.preset, self.scenario, self.out_dir.name)
        run = self.safe.call(
            "creating the run",
            self.client.create_run,
            exp,
            start_time=record.ms(started) if started else None,
            run_name=unique_name(self.safe, exp, name),
            tags=tags,
        )
        if run is None:
            return None
        writer.log_config(self.safe, run.info.run_id, flatten(cfg))
        out.added.append("parent run")
        return str(run.info.run_id)

    def _children(self, exp: str, parent: str, key: str) -> dict[str, Any]:
        """``parent``'s child runs by their tag ``key`` (task or candidate number)."""
        found = self.safe.call(
            f"looking up the runs under {parent}",
            self.client.search_runs,
            [exp],
            filter_string=f"tags.mlflow.parentRunId = '{parent}'",
            max_results=5000,
        )
        self._found = list(found or [])
        best: dict[str, Any] = {}
        for r in self._found:  # an interrupted attempt's run loses to the finished one
            k = r.data.tags.get(key)
            rank = (r.info.status == "FINISHED", r.info.start_time or 0)
            old = best.get(k)
            if old is None or rank > (old.info.status == "FINISHED", old.info.start_time or 0):
                best[k] = r
        return best

    # -------------------------------------------------------------- the tasks
    def _task(self, exp: str, parent: str, t: int, run: Any, out: SyncReport) -> str | None:
        rep = self.tasks[t]
        if run is not None and run.info.status == "FINISHED":
            return str(run.info.run_id)
        if run is None:
            created = self.safe.call(
                "creating a task run",
                self.client.create_run,
                exp,
                start_time=record.ms(rep["started_at"]) if rep.get("started_at") else None,
                run_name=f"task-{record.task_label(t)}",
                tags=record.task_run_tags(parent, t, self.command),
            )
            if created is None:
                return None
            run_id = str(created.info.run_id)
            out.added.append("task run")
        else:
            run_id = str(run.info.run_id)
        capacity = rep.get("total_capacity_pct")
        if capacity is None:
            capacity = float("nan")
        writer.log_task(self.safe, run_id, parent, rep, self.matrix[t], capacity, self.matrix)
        out.added.append("task record")
        if self.cfg.log_candidates:
            self._candidates(exp, run_id, t, out)
        return run_id

    def _candidates(self, exp: str, task_run: str, t: int, out: SyncReport) -> None:
        runs = self._children(exp, task_run, "qpacknet.candidate")
        rep = self.tasks[t]
        for c in rep["candidates"]:
            run = runs.get(str(c["index"]))
            chunk = writer.chunk_of(rep, c["index"])
            winner = c["index"] == rep["winner"]
            if run is not None and run.info.status == "FINISHED" and not winner:
                continue
            worker = self.workers.get(c.get("worker") or "", {})
            run_id = writer.log_candidate(
                self.safe, exp, task_run, t, c, chunk, worker, self.command,
                run_id=None if run is None else str(run.info.run_id),
            )  # fmt: skip
            if run_id is None:
                return
            if run is None:
                out.added.append("candidate run")
            if winner:
                writer.log_train_epochs(self.safe, run_id, rep.get("train_epochs", []))
            writer.finish_candidate(self.safe, run_id, chunk)

    # ------------------------------------------------------------ the versions
    def _versions(self, run_id: str) -> dict[int, str]:
        """Versions this run registered already: task index → version."""
        from qpacknet.tracking.registry import versions_of
        from qpacknet.tracking.tracker import registered_name

        self.model_name = registered_name(self.cfg, self.scenario)
        # None: not registered yet, or a failure lookup reported (then sync stops, exit 2)
        found = self.safe.lookup(
            "looking up model versions", versions_of, self.client, self.model_name
        )
        out = {}
        for v in found or []:
            tags = v.tags or {}
            if tags.get("qpacknet.run_id") == run_id and tags.get("qpacknet.tasks"):
                out[int(tags["qpacknet.tasks"]) - 1] = str(v.version)
        return out

    def _version(
        self,
        t: int,
        task_run: str,
        parent: str | None,
        guard: Lineage | None,
        exp: str,
        out: SyncReport,
    ) -> str | None:
        if parent is None:  # task t-1 was not registered (a conflict, said above)
            out.conflicts.append(
                f"task {t + 1} is not registered: task {t}'s version, its parent, is missing"
            )
            return None
        if not writer.ensure_registered_model(self.safe, self.model_name, self.scenario):
            return None  # a failure ensure_registered_model reported; sync then exits 2
        from qpacknet.model import PackedModel

        tmp = Path(tempfile.mkdtemp(prefix="qpacknet-sync-"))
        try:
            snap = writer.snapshot_after(self.out_dir, t, tmp / "snap")
            shape = PackedModel.load(snap / "model.safetensors").input_shape
            logged = writer.log_model(self.safe, exp, task_run, t, snap, shape, self.run_id)
            if logged is None:
                return None
            acc, _ = record.acc_bwt(self.matrix, t)
            tags = record.version_tags(
                t, parent, self.run_id, self.run_name, self.scenario, self.preset,
                acc,
            )  # fmt: skip
            note = record.version_note(t, parent, self.run_name, self.scenario, self.preset, acc)
            try:
                version = writer.register_version(
                    self.safe, self.model_name, logged, task_run, tags, note, guard
                )
            except RegistryConflict as exc:
                out.conflicts.append(str(exc))
                return None
            if version is not None:
                out.added.append("model version")
            return version
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def int_keys(mapping: Any, what: str) -> dict[int, str]:
    """``{"0": "…"}`` from ``mlflow.json`` as ``{0: "…"}``. A damaged entry is said and
    read as empty: the runs and versions it listed are then found by their tags."""
    try:
        return {int(k): str(v) for k, v in (mapping or {}).items()}
    except (TypeError, ValueError, AttributeError):
        log.warning("mlflow.json: %s is damaged (%r); finding them by their tags", what, mapping)
        return {}


def unique_name(safe: SafeTracking, experiment_id: str, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... if a run of the experiment has it."""
    taken = safe.call(
        "looking up run names",
        safe.client.search_runs,
        [experiment_id],
        filter_string=f"attributes.run_name LIKE '{name}%'",
        max_results=1000,
    )
    names = {r.info.run_name for r in taken or []}
    if name not in names:
        return name
    n = 2
    while f"{name}-{n}" in names:
        n += 1
    return f"{name}-{n}"


def sync_run_dir(out_dir: Path, uri: str | None) -> SyncReport:
    """``qpacknet sync``: the CLI's entry (raises :class:`UsageError` for what the user must
    fix, :class:`TrackingUnavailable` when the server fails)."""
    from qpacknet.tracking.tracker import STATE_FILE, MlflowTracker, resolve_uri

    out_dir = Path(out_dir)
    if not (out_dir / CHECKPOINT_FILE).is_file():
        raise UsageError(
            f"{out_dir} holds no qpacknet run ({CHECKPOINT_FILE} is missing); pass the --out of "
            "a run"
        )
    try:
        state = json.loads((out_dir / CHECKPOINT_FILE).read_text())
        cfg = validate(state["config"]).tracking
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{out_dir / CHECKPOINT_FILE} is damaged ({exc})") from None
    saved: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads((out_dir / STATE_FILE).read_text())
    uri = uri or saved.get("uri") or resolve_uri(cfg, out_dir)
    if saved.get("uri") != uri:
        saved = {}
    cfg = cfg.model_copy(update={"uri": uri, "enabled": True})
    tracker = MlflowTracker(cfg, out_dir)  # the same store set-up as a run
    if not tracker._ready():
        raise TrackingUnavailable(
            f"MLflow at {uri} is not reachable: {tracker.safe.failure if tracker.safe else ''}; "
            "nothing was added. Start the server (or pass --tracking-uri) and run sync again"
        )
    started = time.monotonic()
    sync = RecordSync(tracker.safe, out_dir, cfg)
    report = sync.sync(tracker.experiment_id, None, None, None, saved)
    if tracker.safe.broken:
        raise TrackingUnavailable(
            f"MLflow at {uri} failed while {tracker.safe.failure}; what was added before stays "
            f"({report.summary()}); run sync again when the server is back"
        )
    tracker.run_id, tracker.model_name = report.run_id, sync.model_name
    tracker.task_runs, tracker.versions = report.task_runs, report.versions
    tracker.run_name = sync.run_name
    tracker._save_state()
    report.seconds = time.monotonic() - started
    return report
