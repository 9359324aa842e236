"""The deb, installed with apt into a booted Debian 12 container and run by systemd.

Runs as root where debootstrap and systemd-nspawn exist (CI); skipped elsewhere, or with
LLMD_SYSTEM_TEST=0. The first run builds the cached rootfs with debootstrap (a few minutes);
later runs reuse it. Each step prints how long it took.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from machine import Machine, skip_reason, step

pytestmark = pytest.mark.system

MODEL = "tiny:1m"
UNIT = "llmd.service"
CONF = "/etc/llmd/llmd.toml"
SIM_GPU = "/var/lib/llmd/sim/gpu.json"
# llmd's own environment (inherited by its children): the simulated GPU for nvidia-smi.
SIM_DROPIN = f"""[Service]
Environment=OLLAMA_SIM_GPU={SIM_GPU}
"""
CONFIG = """\
[daemon]
state_dir = "/var/lib/llmd"
admin_socket = "/run/llmd/admin.sock"
log_level = "debug"
shutdown_timeout = "10s"

[proxy]
listen = "127.0.0.1:11434"

[[backend]]
name = "sim"
port = 11435
command = ["ollama", "serve"]
stop_timeout = "5s"
env = { OLLAMA_MODELS = "/var/lib/llmd/models", OLLAMA_SIM_SPEED = "50" }

[[model]]
name = "tiny:1m"
priority = 1
"""


def wait_for(
    what: str, pred: Callable[[], Any], timeout: float = 30, why: Callable[[], str] = str
) -> Any:
    """Poll pred until it returns something true; on timeout, fail with why()."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{why()}")
        time.sleep(0.2)


def show(m: Machine, *props: str) -> dict[str, str]:
    """`systemctl show` properties of the unit."""
    out = m.run("systemctl", "show", UNIT, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(m: Machine, since: float) -> str:
    return m.run(
        "journalctl", "--no-pager", "-o", "cat", "-u", UNIT, f"--since=@{since:.0f}"
    ).stdout


def status(m: Machine, user: str | None = None) -> dict[str, Any]:
    return dict(json.loads(m.run("llmctl", "status", "--json", user=user).stdout))


def child_pid(m: Machine) -> int:
    """The PID of the one backend's child, or 0 while it is not running."""
    r = m.run("llmctl", "status", "--json", check=False)
    if r.returncode != 0:
        return 0
    (backend,) = json.loads(r.stdout)["backends"]
    return int(backend["pid"] or 0) if backend["state"] == "running" else 0


def running_child(m: Machine) -> int:
    """Wait for the backend's child to run; its PID."""

    def why() -> str:
        st = m.run("llmctl", "status", check=False)
        return f"llmctl status: {st.stdout}{st.stderr}\njournal:\n{journal(m, time.time() - 60)}"

    return int(wait_for("the backend to run", lambda: child_pid(m), why=why))


def ollama_processes(m: Machine) -> list[tuple[int, int]]:
    """(pid, ppid) of every `ollama serve` in the container (the simulator runs as python3)."""
    out = m.run("ps", "-eo", "pid=,ppid=,args=").stdout
    return [
        (int(pid), int(ppid))
        for pid, ppid, args in (line.split(None, 2) for line in out.splitlines())
        if re.search(r"(^|[\s/])ollama serve", args)
    ]


def wait_active(m: Machine, old_main: int | None = None, timeout: float = 60) -> int:
    """Wait until the unit is active with a main PID other than old_main; return it."""

    def ready() -> int:
        p = show(m, "ActiveState", "SubState", "MainPID")
        if (p["ActiveState"], p["SubState"]) != ("active", "running"):
            return 0
        pid = int(p["MainPID"])
        return pid if pid and pid != old_main else 0

    since = time.time() - 10
    return int(wait_for("llmd to be active", ready, timeout, why=lambda: journal(m, since)))


def request_count(m: Machine) -> int:
    """Requests saved in llmd.db's main file (checkpointed there when llmd last stopped)."""
    # A running llmd holds its database exclusively; immutable=1 reads the file without locks
    # (and without the newest writes, still in the -wal).
    r = m.run(
        "sqlite3",
        "file:/var/lib/llmd/llmd.db?immutable=1",
        f"SELECT count(*) FROM requests WHERE model = '{MODEL}'",
        user="llmd",  # as the daemon, so no root-owned file is left behind
    )
    return int(r.stdout)


def test_lintian_clean(deb: Path) -> None:
    """lintian finds no error, and no warning left without a reasoned override."""
    if reason := skip_reason("lintian", "dpkg-deb", root=False):
        pytest.skip(reason)
    with step("lintian"):
        r = subprocess.run(
            ["lintian", "--info", "--pedantic", str(deb)],
            capture_output=True,
            text=True,
            check=False,
        )
    tags = [line for line in r.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert tags == [], r.stdout


SKIP_CONTAINER = skip_reason("debootstrap", "systemd-nspawn", "nsenter", "dpkg-deb")


@pytest.mark.skipif(SKIP_CONTAINER is not None, reason=str(SKIP_CONTAINER))
class TestInstalledDeb:
    """From `apt-get install ./llmd_*.deb` to `apt-get purge llmd`, in one booted container."""

    # See conftest.py: after a failed step the rest are skipped, except after these, which
    # put the machine back as they found it.
    incremental = True
    independent = frozenset({"test_invalid_config_is_not_restarted_in_a_loop"})

    def test_apt_install(self, machine: Machine, deb: Path) -> None:
        """apt installs the deb with its dependencies, creates the user, starts nothing."""
        with step("apt-get install ./llmd.deb"):
            machine.run("apt-get", "install", "-y", "-q", f"/root/{deb.name}", timeout=300)
        assert machine.run("dpkg-query", "-W", "-f=${Status}", "llmd").stdout == (
            "install ok installed"
        )
        assert machine.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == (
            "disabled"
        )
        assert machine.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == (
            "inactive"
        )
        passwd = machine.run("getent", "passwd", "llmd").stdout.strip().split(":")
        assert passwd[5:] == ["/var/lib/llmd", "/usr/sbin/nologin"], passwd
        assert "video" in machine.run("id", "-nG", "llmd").stdout.split()
        # This container has no `render` group: the unit must still start (see below).
        assert machine.run("getent", "group", "render", check=False).returncode == 2
        stat = machine.run("stat", "-c", "%U:%G %a", CONF).stdout.strip()
        assert stat == "root:llmd 640"
        conffiles = machine.run("dpkg-query", "-W", "-f=${Conffiles}", "llmd").stdout
        assert CONF in conffiles
        # The shipped reference config is valid under Debian's own Python libraries.
        machine.run("llmd", "--check-config", CONF)
        for page in ("llmd", "llmctl"):
            machine.run("man", "-w", page)

    def test_unit_verifies_and_is_hardened(self, machine: Machine) -> None:
        """systemd-analyze verify is silent and the exposure score stays low."""
        r = machine.run("systemd-analyze", "verify", UNIT, check=False)
        assert (r.returncode, r.stdout + r.stderr) == (0, "")
        out = machine.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
        found = re.search(r"Overall exposure level for \S+: ([\d.]+)", out)
        assert found, out
        print(f"[system] systemd-analyze security llmd: {found[1]}")
        assert float(found[1]) <= 2.0, out

    def test_start_reaches_active_through_ready(self, machine: Machine) -> None:
        """`systemctl enable --now` returns once llmd sent READY=1, with both sockets up."""
        # Edited in place, as sudoedit would: the file keeps its root:llmd 0640.
        machine.write(CONF, CONFIG, mode=0o640, owner="root:llmd")
        machine.write("/etc/systemd/system/llmd.service.d/sim.conf", SIM_DROPIN)
        # The simulator locks and replaces the GPU state file: its directory must be llmd's.
        machine.run("install", "-d", "-o", "llmd", "-g", "llmd", "/var/lib/llmd/sim")
        gpu = {"devices": [{"index": 0, "name": "NVIDIA GeForce RTX 4090", "total_mib": 24564}]}
        machine.write(SIM_GPU, json.dumps(gpu), owner="llmd:llmd")
        machine.run("systemctl", "daemon-reload")
        with step("systemctl enable --now llmd"):
            r = machine.run("systemctl", "enable", "--now", UNIT, check=False, timeout=120)
        assert r.returncode == 0, r.stderr + journal(machine, 0)
        # Type=notify: `active (running)` means llmd said READY=1.
        props = show(machine, "ActiveState", "SubState", "StatusText", "MainPID", "Result")
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
        assert props["StatusText"], "llmd sent no STATUS="
        # Room for client connections beyond systemd's default soft limit of 1024: the unit asks
        # for 65536, which a container gets only up to its own hard limit (its PID 1's), and
        # llmd raises its soft limit to the hard one.
        assert show(machine, "LimitNOFILE")["LimitNOFILE"] == "65536"
        nofile = r"^Max open files\s+(\d+)\s+(\d+)"
        ceiling = re.search(nofile, machine.run("cat", "/proc/1/limits").stdout, re.M)
        limits = machine.run("cat", f"/proc/{props['MainPID']}/limits").stdout
        got = re.search(nofile, limits, re.M)
        assert ceiling and got, limits
        want = min(65536, int(ceiling[2]))
        assert (int(got[1]), int(got[2])) == (want, want), limits
        assert machine.run("stat", "-c", "%A %U:%G", "/run/llmd").stdout.split() == [
            "drwxr-x---",
            "llmd:llmd",
        ]
        sock = machine.run("stat", "-c", "%A %G", "/run/llmd/admin.sock").stdout.split()
        assert sock == ["srw-rw----", "llmd"]
        # The child runs inside the unit's sandbox, as llmd, and holds the GPU groups.
        pid = running_child(machine)
        proc = machine.run("cat", f"/proc/{pid}/status").stdout
        uid = machine.run("id", "-u", "llmd").stdout.strip()
        assert re.search(rf"^Uid:\s+{uid}\s", proc, re.M), proc
        assert re.search(r"^NoNewPrivs:\s+1$", proc, re.M), proc
        assert re.search(r"^CapBnd:\s+0+$", proc, re.M), proc
        video = machine.run("getent", "group", "video").stdout.split(":")[2]
        groups = re.search(r"^Groups:(.*)$", proc, re.M)
        assert groups and video in groups[1].split(), proc
        cgroup = machine.run("cat", f"/proc/{pid}/cgroup").stdout
        assert "/system.slice/llmd.service" in cgroup, cgroup

    def test_llmctl_needs_group_llmd(self, machine: Machine) -> None:
        """root and members of group llmd may use llmctl; anyone else gets exit 3."""
        machine.run("useradd", "--create-home", "--groups", "llmd", "alice")
        machine.run("useradd", "--create-home", "bob")
        assert status(machine)["backends"][0]["name"] == "sim"
        doc = status(machine, user="alice")
        assert doc["pid"] == int(show(machine, "MainPID")["MainPID"])
        r = machine.run("llmctl", "status", user="bob", check=False)
        assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
        assert "ermission denied" in r.stderr, r.stderr

    def test_streamed_request_through_proxy(self, machine: Machine) -> None:
        """curl gets a streamed answer from the simulator through the proxy port."""
        body = json.dumps({"model": MODEL, "prompt": "Why is the sky blue?"})
        for _ in range(3):
            with step("streamed /api/generate via the proxy"):
                r = machine.run("curl", "-sSfN", "http://127.0.0.1:11434/api/generate", "-d", body)
            chunks = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
            assert len(chunks) > 2, r.stdout
            assert all(c["model"] == MODEL for c in chunks)
            assert not any(c["done"] for c in chunks[:-1]) and chunks[-1]["done"] is True
            assert "".join(c["response"] for c in chunks).strip()
        tags = json.loads(machine.run("curl", "-sSf", "http://127.0.0.1:11434/api/tags").stdout)
        assert MODEL in [t["name"] for t in tags["models"]]

    def test_reload_keeps_the_child(self, machine: Machine) -> None:
        """`systemctl reload` re-reads the config in place: same daemon, same child."""
        main = int(show(machine, "MainPID")["MainPID"])
        child = running_child(machine)
        since = time.time()
        with step("systemctl reload llmd"):
            machine.run("systemctl", "reload", UNIT)
        wait_active(machine)
        assert int(show(machine, "MainPID")["MainPID"]) == main
        assert running_child(machine) == child
        assert "Reloaded" in journal(machine, since - 1)

    def test_restart_keeps_learned_statistics(self, machine: Machine) -> None:
        """The request history in /var/lib/llmd survives `systemctl restart`."""
        main = int(show(machine, "MainPID")["MainPID"])
        before = machine.run("llmctl", "events", "--json").stdout
        with step("systemctl restart llmd"):
            machine.run("systemctl", "restart", UNIT, timeout=120)
        wait_active(machine, old_main=main)
        # The three streamed requests were flushed on the way down and are still there.
        assert request_count(machine) >= 3
        old_events = json.loads(before)["events"]
        new_events = json.loads(machine.run("llmctl", "events", "--json").stdout)["events"]
        assert old_events, "no events recorded before the restart"
        assert all(e in new_events for e in old_events), (old_events, new_events)

    def test_kill_9_restarts_without_orphans(self, machine: Machine) -> None:
        """After `kill -9` of llmd, systemd restarts it and the old child is gone."""
        props = show(machine, "MainPID", "NRestarts")
        main, restarts = int(props["MainPID"]), int(props["NRestarts"])
        child = running_child(machine)
        with step("kill -9 llmd until active again"):
            machine.run("kill", "-9", str(main))
            new_main = wait_active(machine, old_main=main)
            wait_for("a new child", lambda: child_pid(machine) not in (0, child))
        assert int(show(machine, "NRestarts")["NRestarts"]) == restarts + 1
        assert machine.run("test", "-e", f"/proc/{child}", check=False).returncode == 1
        assert ollama_processes(machine) == [(child_pid(machine), new_main)]

    def test_watchdog_restarts_a_hung_daemon(self, machine: Machine) -> None:
        """A daemon that stops answering the watchdog is killed and restarted."""
        dropin = "/etc/systemd/system/llmd.service.d/watchdog.conf"
        machine.write(dropin, "[Service]\nWatchdogSec=2s\n")
        machine.run("systemctl", "daemon-reload")
        machine.run("systemctl", "restart", UNIT, timeout=120)
        main = wait_active(machine)
        since = time.time()
        with step("SIGSTOP llmd until the watchdog restarted it"):
            machine.run("kill", "-STOP", str(main))
            new_main = wait_active(machine, old_main=main, timeout=60)
        log = journal(machine, since - 1)
        assert "Watchdog timeout" in log, log
        wait_for("one child of the new daemon", lambda: len(ollama_processes(machine)) == 1)
        assert ollama_processes(machine)[0][1] == new_main
        machine.run("rm", dropin)
        machine.run("systemctl", "daemon-reload")

    def test_stop_leaves_nothing_running(self, machine: Machine) -> None:
        """`systemctl stop` ends llmd cleanly and takes its children with it."""
        with step("systemctl stop llmd"):
            machine.run("systemctl", "stop", UNIT, timeout=120)
        props = show(machine, "ActiveState", "Result")
        assert props == {"ActiveState": "inactive", "Result": "success"}, props
        assert machine.run("pgrep", "-u", "llmd", check=False).returncode == 1
        assert machine.run("test", "-e", "/run/llmd", check=False).returncode == 1
        machine.run("systemctl", "start", UNIT, timeout=120)

    def test_reinstall_keeps_the_edited_config_and_restarts(
        self, machine: Machine, deb: Path
    ) -> None:
        """Reinstalling, as an upgrade does, keeps the local config and restarts llmd."""
        main = int(show(machine, "MainPID")["MainPID"])
        with step("apt-get install --reinstall ./llmd.deb"):
            machine.run("apt-get", "install", "--reinstall", "-y", "-q", f"/root/{deb.name}")
        assert machine.run("cat", CONF).stdout == CONFIG
        assert machine.run("stat", "-c", "%U:%G %a", CONF).stdout.strip() == "root:llmd 640"
        wait_active(machine, old_main=main)

    def test_invalid_config_is_not_restarted_in_a_loop(self, machine: Machine) -> None:
        """An invalid config fails the start with exit 78, which the unit does not restart."""
        machine.write(CONF, CONFIG + "bogus_key = 1\n", mode=0o640, owner="root:llmd")
        since = time.time() - 1
        try:
            r = machine.run("systemctl", "restart", UNIT, check=False, timeout=120)
            assert r.returncode != 0
            time.sleep(4)  # twice RestartSec: an automatic restart would have happened by now
            props = show(machine, "ActiveState", "ExecMainStatus", "NRestarts")
            log = journal(machine, since)
            assert "bogus_key" in log, log
            # NRestarts counts automatic restarts since the last manual start.
            assert props == {"ActiveState": "failed", "ExecMainStatus": "78", "NRestarts": "0"}, (
                f"{props}\n{log}"
            )
        finally:
            machine.write(CONF, CONFIG, mode=0o640, owner="root:llmd")
            machine.run("systemctl", "reset-failed", UNIT)
            machine.run("systemctl", "restart", UNIT, timeout=120)

    def test_purge_removes_everything(self, machine: Machine) -> None:
        """`apt-get purge` stops llmd and removes the unit, the user, the group and the state."""
        assert machine.run("test", "-s", "/var/lib/llmd/llmd.db", check=False).returncode == 0
        uid = machine.run("id", "-u", "llmd").stdout.strip()
        with step("apt-get purge llmd"):
            machine.run("apt-get", "purge", "-y", "-q", "llmd", timeout=120)
        assert machine.run("pgrep", "-u", uid, check=False).returncode == 1
        assert ollama_processes(machine) == []
        for path in (
            "/lib/systemd/system/llmd.service",
            "/etc/systemd/system/multi-user.target.wants/llmd.service",
            "/var/lib/llmd",
            CONF,
            "/usr/bin/llmd",
        ):
            assert machine.run("test", "-e", path, check=False).returncode == 1, path
        assert show(machine, "LoadState") == {"LoadState": "not-found"}
        assert machine.run("getent", "passwd", "llmd", check=False).returncode == 2
        assert machine.run("getent", "group", "llmd", check=False).returncode == 2
        r = machine.run("dpkg-statoverride", "--list", CONF, check=False)
        assert r.returncode == 1, r.stdout
