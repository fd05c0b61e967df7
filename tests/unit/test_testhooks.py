"""The test-only hook (hostagent.testhooks): inert when unset, step names checked at start,
a real SIGKILL or SIGSTOP at the named step, and reached at every step boundary, in order,
by the real reconciler (the world of test_reconciler_faults: libvirt's test driver)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pytest_mock import MockerFixture

from hostagent.errors import ConfigError
from hostagent.model import Phase
from hostagent.testhooks import CRASH_AFTER, FREEZE_AFTER, Hook, Point
from tests.unit.test_reconciler_faults import World, until, world

__all__ = ["world"]  # the reconciler's world, shared with test_reconciler_faults


def test_unset_it_does_nothing_at_any_step(mocker: MockerFixture) -> None:
    kill = mocker.patch("os.kill")
    hook = Hook.from_environ({"PATH": "/usr/bin", CRASH_AFTER: "", FREEZE_AFTER: ""})
    assert (hook.crash_after, hook.freeze_after) == (None, None)
    for point in Point:
        hook.reached(point)
    kill.assert_not_called()


def test_each_step_name_is_known() -> None:
    for point in Point:
        hook = Hook.from_environ({CRASH_AFTER: point.value, FREEZE_AFTER: point.value})
        assert (hook.crash_after, hook.freeze_after) == (point, point)


@pytest.mark.parametrize("variable", [CRASH_AFTER, FREEZE_AFTER])
def test_an_unknown_step_is_refused_at_start(variable: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Hook.from_environ({variable: "definee"})
    message = str(refused.value)
    assert f"{variable}='definee' names no step" in message
    assert "network, directories, certificates, config-drive, disk, files, define" in message


def test_serve_refuses_an_unknown_step_before_starting_anything(tmp_path: Path) -> None:
    config = tmp_path / "hostagent.toml"
    config.write_text(f'host_id = "h1"\nstate_dir = "{tmp_path / "state"}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "hostagent", "-c", str(config), "serve"],
        env={**os.environ, CRASH_AFTER: "nope"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"hostagent: {CRASH_AFTER}='nope' names no step" in done.stderr
    assert not (tmp_path / "state").exists()


def run_child(code: str) -> subprocess.Popen[str]:
    script = "from hostagent.testhooks import Hook, Point\n" + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_the_named_step_kills_the_process() -> None:
    child = run_child(
        """
        hook = Hook(crash_after=Point.DEFINE)
        for point in (Point.FILES, Point.DEFINE, Point.START):
            print(point.value, flush=True)
            hook.reached(point)
        """
    )
    out, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert out.split() == ["files", "define"]


def test_the_named_step_stops_the_process_once_until_it_is_continued() -> None:
    child = run_child(
        """
        hook = Hook(freeze_after=Point.DISK)
        for point in (Point.DISK, Point.DISK):
            hook.reached(point)
        print("continued", flush=True)
        """
    )
    try:
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
        os.kill(child.pid, signal.SIGCONT)
        out, _ = child.communicate(timeout=30)
    finally:
        child.kill()
        child.wait()
    assert out.split() == ["continued"]
    assert child.returncode == 0


class Recorder(Hook):
    def __init__(self) -> None:
        super().__init__()
        self.points: list[Point] = []

    def reached(self, point: Point) -> None:
        self.points.append(point)


async def test_the_reconciler_reaches_every_step_boundary_in_order(world: World) -> None:
    recorder = Recorder()
    world.provisioner.hook = recorder
    await world.put()
    await until(lambda: world.node().phase is Phase.RUNNING)
    made = recorder.points[:]
    parallel = {Point.CERTIFICATES, Point.CONFIG_DRIVE, Point.DISK}
    assert made[:2] == [Point.NETWORK, Point.DIRECTORIES]
    assert set(made[2:5]) == parallel
    assert made[5:] == [Point.FILES, Point.DEFINE, Point.START, Point.RUNNING]

    await world.store.mark_deleting(world.key)
    world.reconciler.enqueue(world.key)
    await until(
        lambda: world.store.get(world.key) is None and Point.NETWORK_TEARDOWN in recorder.points
    )
    assert recorder.points[len(made) :] == [
        Point.SHUTDOWN,
        Point.UNDEFINE,
        Point.REMOVE_FILES,
        Point.CLUSTER_GONE,
        Point.FORGET,
        Point.NETWORK_TEARDOWN,
    ]
