"""The note about Ray processes left by an earlier killed job (issue 31, item 9) names only processes of
this user's own earlier jobs of this project, recorded when their private cluster started, never another
job's or another user's Ray processes on a shared host."""

import contextlib
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from pipeline.ray_cluster import leftover_processes


@pytest.fixture
def orphans():
    """Start processes named like Ray workers (`ray::...`), re-parented to init as a killed job's are."""
    started = []

    def start(name: str, raylet_pid: int) -> psutil.Process:
        code = (
            "import os, sys, time\n"
            "if os.fork():\n"
            "    print(os.getpid(), flush=True); os._exit(0)\n"  # the parent dies: the child goes to init
            f"open('/proc/self/comm', 'w').write({name!r})\n"
            "time.sleep(120)\n"
        )
        env = dict(os.environ, RAY_RAYLET_PID=str(raylet_pid))
        subprocess.run([sys.executable, "-c", code], env=env, check=True, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:  # the grandchild's pid: the one named `name` whose env says raylet_pid
            for p in psutil.process_iter(["name", "ppid"]):
                if p.info["name"] == name and p.info["ppid"] == 1:
                    started.append(p)
                    return p
            time.sleep(0.1)
        raise AssertionError(f"no orphan named {name}")

    yield start
    for p in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def test_only_processes_of_this_projects_recorded_clusters_are_named(tmp_path, monkeypatch, orphans):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    mine = orphans("ray::MapWorker", 999_001)  # left by our killed job, whose raylet was 999001
    theirs = orphans("ray::OtherJob", 999_002)  # another job's (another user's, another project's)
    clusters = tmp_path / "re2pix" / "ray-clusters"
    clusters.mkdir(parents=True)
    dead_driver = [999_003, 1.0]  # no such process: that job was killed
    (clusters / "999003.json").write_text(json.dumps({"driver": dead_driver, "raylets": [999_001], "processes": []}))
    found = leftover_processes()
    assert found == [f"{mine.pid} (ray::MapWorker)"]
    assert all(str(theirs.pid) not in f for f in found)


def test_an_agent_is_matched_by_its_recorded_pid_and_start_time(tmp_path, monkeypatch, orphans):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    agent = orphans("ray::DashAgent", 0)  # Ray's agents carry no RAY_RAYLET_PID of their cluster
    record = {"driver": [999_004, 1.0], "raylets": [], "processes": [[agent.pid, agent.create_time()]]}
    clusters = tmp_path / "re2pix" / "ray-clusters"
    clusters.mkdir(parents=True)
    (clusters / "999004.json").write_text(json.dumps(record))
    assert leftover_processes() == [f"{agent.pid} (ray::DashAgent)"]
    agent.kill()
    agent.wait(5)
    assert leftover_processes() == [] and not list(clusters.iterdir())  # nothing left: the record goes


def test_nothing_recorded_names_nothing(tmp_path, monkeypatch, orphans):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    orphans("ray::Stranger", 999_005)
    assert leftover_processes() == []
