"""Concurrent ``qpacknet learn`` against a real ``mlflow server``: no fork, no lost task.

Two learns of one registered model on one host: the second waits for the first and learns on
top of its new version. Two on different hosts (separate lock directories, as two machines
would have): the first to register wins and the other stops with exit 2 naming the winner, so
the parent never has two children. Every version names its parent; the alias follows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qpacknet.cli import main
from qpacknet.tracking.registry import ALIAS, PARENT_TAG
from qpacknet.tracking.server import mlflow_server

ROOT = Path(__file__).resolve().parents[1]
NAME = "qpacknet-digits"
FAST = [
    "--set",
    "search.population=2",
    "--set",
    "search.epochs=1",
    "--set",
    "train.epochs=2",
    "--set",
    "threads=1",
]


def _learn(uri: str, out: Path, lock_dir: Path, model: str = f"models:/{NAME}/latest") -> list:
    cmd = [sys.executable, "-m", "qpacknet", "learn", "--model", model, "--tracking-uri", uri]
    env = {**os.environ, "QPACKNET_LOCK_DIR": str(lock_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return [
        [*cmd, "--out", str(out), "--executor", "local", "--quiet", *FAST],
        env,
    ]


def _start_pair(uri: str, tmp: Path, name: str, lock_dirs: tuple[Path, Path]) -> list[tuple]:
    procs = []
    for i, lock in enumerate(lock_dirs):
        cmd, env = _learn(uri, tmp / f"{name}-{i}", lock)
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return [(p, *p.communicate(timeout=300)) for p in procs]


def _versions(client: object) -> dict[int, dict[str, str]]:
    return {
        int(v.version): dict(v.tags)
        for v in client.search_model_versions(f"name = '{NAME}'")  # type: ignore[attr-defined]
    }


def _chain(versions: dict[int, dict[str, str]]) -> list[tuple[int, str, str]]:
    return [(v, t["qpacknet.tasks"], t[PARENT_TAG]) for v, t in sorted(versions.items())]


def test_two_concurrent_learns_neither_fork_nor_lose_a_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    with mlflow_server(tmp_path) as uri:
        first = ["run", "--preset", "digits", "--set", "scenario.num_tasks=1", *FAST]
        assert main([*first, "--tracking-uri", uri, "--executor", "local", "--quiet",
                     "--out", str(tmp_path / "base")]) == 0  # fmt: skip
        client = MlflowClient(uri, uri)
        assert _versions(client)[1][PARENT_TAG] == ""

        # one host: the second learn waits, then learns on top of the first one's version
        lock = tmp_path / "locks"
        done = _start_pair(uri, tmp_path, "same-host", (lock, lock))
        for proc, _, err in done:
            assert proc.returncode == 0, err[-3000:]
        waited = [err for _, _, err in done if "waiting for qpacknet learn --model" in err]
        assert len(waited) == 1, [err[-1500:] for _, _, err in done]
        versions = _versions(client)
        assert sorted(versions) == [1, 2, 3]
        assert [versions[v]["qpacknet.tasks"] for v in (2, 3)] == ["2", "3"]
        assert [versions[v][PARENT_TAG] for v in (2, 3)] == ["1", "2"]
        assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == "3"
        with capsys.disabled():  # the outcome, shown with pytest -s
            for i, (proc, out, err) in enumerate(done):
                said = [ln for ln in (out + err).splitlines() if "waiting for" in ln or
                        "learning task" in ln]  # fmt: skip
                print(f"same host, learn {i}: exit {proc.returncode}; " + " | ".join(said))
            print("versions (number, tasks, parent):", _chain(versions))
        late = [out for _, out, _ in done if "learning task 3 on top of" in out]
        assert len(late) == 1 and "version 2, 2 tasks" in late[0]

        # an explicit version that already has a child is refused before training
        capsys.readouterr()
        cmd, _ = _learn(uri, tmp_path / "fork", lock, f"models:/{NAME}/1")
        assert main(cmd[3:]) == 2
        err = capsys.readouterr().err
        assert f"version 1 of '{NAME}' already has a child, version 2 (2 tasks" in err
        assert f"models:/{NAME}/2 or models:/{NAME}/latest" in err
        assert not (tmp_path / "fork" / "model.safetensors").exists()

        # two hosts (no shared lock): one registers version 4, the other is refused
        done = _start_pair(uri, tmp_path, "two-hosts", (tmp_path / "a", tmp_path / "b"))
        codes = sorted(proc.returncode for proc, _, _ in done)
        assert codes == [0, 2], [err[-3000:] for _, _, err in done]
        loser = next(err for proc, _, err in done if proc.returncode == 2)
        print("two hosts: exits", codes, "| loser said:", loser.strip().splitlines()[-1])
        assert "version 4 (4 tasks, from version 3" in loser
        assert f"learn --model models:/{NAME}/latest again" in loser
        versions = _versions(client)
        assert sorted(versions) == [1, 2, 3, 4]
        assert versions[4][PARENT_TAG] == "3"
        print("versions (number, tasks, parent):", _chain(versions))
        assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == "4"


class _Version:
    def __init__(self, version: int, parent: str) -> None:
        self.version, self.run_id = version, f"run-{version}"
        self.tags = {PARENT_TAG: parent, "qpacknet.tasks": "2"}


class _Registry:
    """Two hosts registered children of version 1 at the same moment: versions 2 and 3."""

    def __init__(self) -> None:
        self.versions = [_Version(1, ""), _Version(2, "1"), _Version(3, "1")]
        self.deleted: list[str] = []

    def search_model_versions(self, *_: object, **__: object) -> list[_Version]:
        return [v for v in self.versions if str(v.version) not in self.deleted]

    def delete_model_version(self, name: str, version: str) -> None:
        self.deleted.append(version)


def test_the_later_of_two_simultaneous_children_withdraws_itself() -> None:
    from qpacknet.tracking.registry import Lineage, RegistryConflict, check_after_register

    registry = _Registry()
    lineage = Lineage("1", True, "/work/dir", 1)
    check_after_register(registry, NAME, lineage, "2")  # the lower number wins: no error
    assert registry.deleted == []
    with pytest.raises(RegistryConflict) as err:
        check_after_register(registry, NAME, lineage, "3")
    assert registry.deleted == ["3"]
    assert "version 2 (2 tasks, from version 1, run run-2) was registered from version 1" in str(
        err.value
    )
    assert "this learn's version 3, which was withdrawn" in str(err.value)


def test_extending_a_run_whose_last_version_was_learned_on_refuses_to_fork(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run registered version 1; a learn added version 2 on top of it; the run itself is
    then extended (add_task, or run with more tasks): its task 2 would be a second child of
    version 1, so it is committed in its directory but not registered, and the command exits
    2 naming version 2."""
    from mlflow import MlflowClient

    monkeypatch.setenv("QPACKNET_LOCK_DIR", str(tmp_path / "locks"))
    store = f"sqlite:///{tmp_path / 'store.db'}"
    run = ["run", "--preset", "digits", *FAST, "--executor", "local", "--quiet",
           "--tracking-uri", store, "--out", str(tmp_path / "run")]  # fmt: skip
    assert main([*run, "--set", "scenario.num_tasks=1"]) == 0
    learn = ["learn", "--model", f"models:/{NAME}/latest", "--tracking-uri", store]
    assert main([*learn, "--executor", "local", "--quiet", "--out", str(tmp_path / "l")]) == 0
    capsys.readouterr()
    assert main([*run, "--set", "scenario.num_tasks=2"]) == 2
    err = capsys.readouterr().err
    assert f"version 1 of '{NAME}' already has a child: version 2 (2 tasks, from version 1" in err
    client = MlflowClient(store, store)
    chain = sorted(
        (int(v.version), v.tags[PARENT_TAG]) for v in client.search_model_versions(f"name='{NAME}'")
    )
    assert chain == [(1, ""), (2, "1")]
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == "2"


def test_learned_lineage_reads_the_checkpoint_and_refuses_a_damaged_one(tmp_path: Path) -> None:
    """A resumed learn attaches to the version its checkpoint names; a run dir without a
    checkpoint, or one no learn wrote, has none; a damaged ``learned_from`` stops with exit 2
    instead of registering without the parent check (which could fork the lineage)."""
    from qpacknet.checkpoint import save_checkpoint
    from qpacknet.errors import ModelFileError
    from qpacknet.tracking.tracker import learned_lineage

    assert learned_lineage(tmp_path) is None
    base = {"config": {}, "matrix": [], "tasks": [], "seconds": 0.0}
    save_checkpoint(tmp_path, base)
    assert learned_lineage(tmp_path) is None
    learned = {"version": "3", "from_latest": True, "tasks": 3}
    save_checkpoint(tmp_path, {**base, "learned_from": learned})
    lineage = learned_lineage(tmp_path)
    assert lineage is not None and (lineage.parent, lineage.from_latest) == ("3", True)
    assert lineage.first_task == 3
    save_checkpoint(tmp_path, {**base, "learned_from": {"version": "3"}})
    with pytest.raises(ModelFileError, match=r"learned_from is damaged.*new --out"):
        learned_lineage(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="is damaged"):
        learned_lineage(tmp_path)
