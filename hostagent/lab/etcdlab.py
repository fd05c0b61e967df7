"""The lab's etcd cluster (haplan.py plans it): certificates of a lab etcd CA, the members
as processes of the root namespace (Debian's /usr/bin/etcd), their health and leader as
etcd's own HTTP gateway answers, and stopping them (found by pid file and command line,
so `lab down` also cleans up after a crashed `lab up`)."""

from __future__ import annotations

import logging
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from common import http
from hostagent.lab import procs
from hostagent.lab.errors import LabError
from hostagent.lab.haplan import MemberPlan, ZonePlan, etcd_argv
from pki import servicecerts

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
CLIENT_NAME = "zone"  # the replicas' client certificate: <etcd>/client/zone.{crt,key}


def issue_certificates(plan: ZonePlan) -> None:
    """Each member's certificate (server and peer: its address, both usages) and the
    replicas' client certificate, of the lab's etcd CA (made on first use)."""
    for member in plan.members:
        servicecerts.issue_cert(
            plan.etcd_ca_dir, member.name, [member.address], member.dir, client=True
        )
    servicecerts.issue_cert(plan.etcd_ca_dir, CLIENT_NAME, [], plan.etcd_client_dir, client=True)


def client_files(plan: ZonePlan) -> tuple[Path, Path, Path]:
    """The CA, certificate and key a client of the lab's etcd uses."""
    directory = plan.etcd_client_dir
    return (
        plan.etcd_ca_dir / "ca.crt",
        directory / f"{CLIENT_NAME}.crt",
        directory / f"{CLIENT_NAME}.key",
    )


def start(plan: ZonePlan, timeout: float = START_TIMEOUT_S) -> None:
    """Every member (a member answers only once a quorum is up: all start, then wait)."""
    binary = shutil.which("etcd")
    if binary is None:
        raise LabError("no etcd binary: install Debian's etcd-server (scripts/setup-host.sh)")
    issue_certificates(plan)
    for member in plan.members:
        launch(plan, member, binary)
    deadline = time.monotonic() + timeout
    for member in plan.members:
        wait_healthy(plan, member, deadline - time.monotonic())


def launch(plan: ZonePlan, member: MemberPlan, binary: str = "etcd") -> int:
    """Start one member (again: on its data directory) unless it runs; its PID."""
    pid = procs.running(member.pid_file, _marker(member))
    if pid is not None:
        return pid
    member.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with member.log.open("ab") as output:
        process = subprocess.Popen(
            etcd_argv(plan, member, binary),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    member.pid_file.write_text(f"{process.pid}\n")
    return process.pid


def wait_healthy(plan: ZonePlan, member: MemberPlan, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not healthy(plan, member):
        if procs.running(member.pid_file, _marker(member)) is None:
            raise LabError(f"etcd member {member.name} exited; see {member.log}")
        if time.monotonic() > deadline:
            raise LabError(f"etcd member {member.name} not healthy in time; see {member.log}")
        time.sleep(0.2)


def healthy(plan: ZonePlan, member: MemberPlan) -> bool:
    try:
        with _client(plan, member) as client:
            return bool(client.get("/health").json().get("health") == "true")
    except (http.HTTPError, ValueError, OSError):
        return False


def status(plan: ZonePlan, member: MemberPlan) -> dict[str, Any]:
    """Whether the member runs and is healthy, and whether it is the etcd leader (etcd's
    Maintenance.Status through its HTTP gateway)."""
    pid = procs.running(member.pid_file, _marker(member))
    view: dict[str, Any] = {"name": member.name, "endpoint": member.client_url, "pid": pid}
    view["healthy"] = pid is not None and healthy(plan, member)
    view["leader"] = None
    if view["healthy"]:
        try:
            with _client(plan, member) as client:
                answer = client.post("/v3/maintenance/status", json={}).json()
            view["leader"] = answer["header"]["member_id"] == answer["leader"]
            view["raft_term"] = int(answer.get("raftTerm", 0))
        except (http.HTTPError, ValueError, KeyError, OSError) as exc:
            view["problem"] = str(exc)
    return view


def leader(plan: ZonePlan) -> MemberPlan | None:
    """The member that leads etcd now, as it says itself."""
    for member in plan.members:
        if status(plan, member).get("leader"):
            return member
    return None


def stop(plan: ZonePlan, timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """Stop every member of the plan that runs; what was stopped."""
    stopped = []
    for member in plan.members:
        pid = procs.stop(member.pid_file, _marker(member), timeout)
        if pid is not None:
            stopped.append(f"etcd member {member.name} (pid {pid})")
    return stopped


def pid(member: MemberPlan) -> int | None:
    return procs.running(member.pid_file, _marker(member))


def _marker(member: MemberPlan) -> str:
    return f"--data-dir={member.data_dir}"


def _client(plan: ZonePlan, member: MemberPlan) -> http.Client:
    ca, cert, key = client_files(plan)
    try:
        tls = http.tls_context(ca, cert_file=cert, key_file=key)
    except (OSError, ssl.SSLError) as exc:
        raise LabError(f"the lab's etcd client certificate {cert}: {exc}") from exc
    return http.client(member.client_url, tls=tls, timeout_s=2.0)
