"""A booted Debian 12 container for the system test: cached rootfs, systemd-nspawn, nsenter.

The root filesystem comes from debootstrap once and is kept as a tarball under the cache
directory, keyed by what goes into it; the .debs that apt downloads are kept there too. Each
run unpacks a fresh copy, boots it with `systemd-nspawn --boot` on a private network (its own
loopback, so its port 11434 is not the host's) and runs commands inside with `nsenter`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

SUITE = "bookworm"
# What the rootfs has before the deb comes: systemd to boot, the tools the test drives it
# with (curl, sqlite3, procps's pgrep) and man-db, so `systemd-analyze verify` checks the
# unit's Documentation= man pages.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "curl", "sqlite3", "procps", "man-db")
# Bump to rebuild every cached rootfs after changing how one is prepared.
ROOTFS_FORMAT = 1
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV = ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"]

TIMINGS: list[tuple[str, float]] = []


@contextmanager
def step(name: str) -> Iterator[None]:
    """Time one step of the system test; the times are printed at the end of the run."""
    start = time.monotonic()
    try:
        yield
    finally:
        took = time.monotonic() - start
        TIMINGS.append((name, took))
        print(f"[system] {name}: {took:.1f}s", file=sys.stderr, flush=True)


def skip_reason(*tools: str, root: bool = True) -> str | None:
    """Why the system test cannot run here, or None."""
    if os.environ.get("LLMD_SYSTEM_TEST") == "0":
        return "LLMD_SYSTEM_TEST=0"
    if root and os.geteuid() != 0:
        return "needs root (debootstrap, systemd-nspawn)"
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (apt-get install debootstrap systemd-container lintian)"
    return None


def cache_dir() -> Path:
    path = Path(os.environ.get("LLMD_SYSTEM_TEST_CACHE", "/var/cache/llmd-system-test"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(argv: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a host command; raise with its output if it fails."""
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def rootfs_tarball(cache: Path) -> Path:
    """The cached minimal bookworm rootfs with PACKAGES, made by debootstrap when missing."""
    key = f"{ROOTFS_FORMAT} {SUITE} minbase {' '.join(sorted(PACKAGES))}"
    tarball = cache / f"rootfs-{SUITE}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.tar"
    if tarball.exists():
        return tarball
    debs = cache / "debootstrap-debs"
    debs.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="debootstrap-") as tmp:
        root = Path(tmp) / "root"
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                f"--cache-dir={debs}",
                SUITE,
                str(root),
            ],
            timeout=1200,
        )
        # apt's downloads live in the shared archive cache instead (see prepare_debs).
        for deb in (root / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        # The container gets its hostname from its machine name.
        (root / "etc/hostname").unlink(missing_ok=True)
        partial = tarball.with_suffix(".tar.part")
        run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."])
        partial.rename(tarball)
    return tarball


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def unpack_rootfs(cache: Path, tarball: Path) -> Path:
    """A fresh copy of the rootfs, in a directory named for this process."""
    for stale in cache.glob("run-*"):
        # Left behind by a run that was killed before it could clean up.
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(dir=cache, prefix=f"run-{os.getpid()}-"))
    root = workdir / "root"
    root.mkdir()
    run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-xf", str(tarball)])
    return root


def apt_archives(cache: Path) -> Path:
    path = cache / "apt-archives"
    (path / "partial").mkdir(parents=True, exist_ok=True)
    return path


def prepare_debs(root: Path, archives: Path, deb_in_root: str) -> None:
    """Download what installing the deb needs into the archive cache, before the boot.

    This is the only step with network access; the booted container has a private network
    and installs from the cache. If the rootfs's package lists are too old for the mirror,
    refresh them and try again.
    """
    nspawn = [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        f"--directory={root}",
        f"--bind={archives}:/var/cache/apt/archives",
        "--as-pid2",
        "--",
        *ENV,
    ]
    download = [*nspawn, "apt-get", "install", "--download-only", "-y", "-q", deb_in_root]
    try:
        run(download)
    except RuntimeError:
        run([*nspawn, "apt-get", "update", "-q"])
        run(download)


class Machine:
    """One booted systemd container."""

    def __init__(self, root: Path, name: str, binds: Sequence[str] = ()) -> None:
        self.root = root
        self.name = name
        self.binds = list(binds)
        self.log_path = root.parent / "boot.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 60) -> None:
        """Boot the container and wait until its systemd has finished starting up."""
        argv = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            f"--directory={self.root}",
            f"--machine={self.name}",
            # No machined/D-Bus on the host is needed: nspawn stays in the caller's cgroup.
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--console=read-only",
            *(f"--bind={b}" for b in self.binds),
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"systemd-nspawn exited {self.proc.returncode}:\n{self.boot_log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the container's systemd did not start:\n{self.boot_log()}")
            self.leader = self._find_leader()
            time.sleep(0.05)
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"boot did not finish (state {state!r}):\n{self.boot_log()}")
            r = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=30)
            state = r.stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.2)
        if state == "degraded":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            print(f"[system] container booted degraded:\n{failed}", file=sys.stderr)

    def _find_leader(self) -> int:
        assert self.proc is not None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            for pid in children.split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        except OSError:
            pass
        return 0

    def boot_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def run(
        self,
        *argv: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container, as root or as `user`, with a clean environment."""
        env = [*ENV, "HOME=/root"]
        if user is not None:
            # runuser sets HOME, SHELL, USER and LOGNAME from the user's passwd entry.
            env = [*ENV, "runuser", "-u", user, "--"]
        cmd = ["nsenter", "-t", str(self.leader), "-a", "--", *env, *argv]
        r = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"in container: {' '.join(argv)} exited {r.returncode}\n"
                f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
            )
        return r

    def write(self, path: str, text: str, mode: int = 0o644, owner: str = "root:root") -> None:
        """Write a file inside the (running) container."""
        user, group = owner.split(":")
        self.run(
            *("install", "-D", "-m", f"{mode:o}", "-o", user, "-g", group, "/dev/stdin", path),
            input=text,
        )

    def shutdown(self, timeout: float = 20) -> None:
        """Power the container off; kill it if it does not go in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.leader:
            try:
                # SIGRTMIN+4 asks systemd for a poweroff; no need for a working systemctl.
                os.kill(self.leader, signal.SIGRTMIN + 4)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            # Killing PID 1 of the container's PID namespace kills everything in it.
            try:
                if self.leader <= 0:  # never os.kill(0, ...): that is our own process group
                    raise ProcessLookupError
                os.kill(self.leader, signal.SIGKILL)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
