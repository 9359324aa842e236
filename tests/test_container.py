"""The container image (deploy/container/Containerfile): always linted; built and run with podman.

The lint parses the Containerfile (a small parser below: continuations, comments, stages, ARG
expansion) and checks what a broken image would hide until someone runs it: COPY sources that
are missing from the build context (the tree's top), `--from` naming no earlier stage, a root
USER, a HEALTHCHECK that is not /readyz, the proxy port not exposed, an image config that does
not listen on every address or keeps models outside every VOLUME, a base image defaulting to a
registry host or an unpinned tag. Mutations of the real file show that each check catches what
it is for.

The build test runs as root where podman is installed (`apt-get install podman runc`; `.ci/run`
installs them), offline as far as registries go: the base image is the system test's cached
debootstrap rootfs (tests/system/machine.py) imported into a throwaway podman store, and the
"official Ollama image" is a stand-in holding the simulator (tests/sim) at /usr/bin/ollama and
/usr/lib/ollama. Only the build's apt-get reaches Debian's mirror. The real Containerfile is
built with --build-arg BASE_IMAGE/OLLAMA_IMAGE pointing at them, run with a test config, and
must become healthy, answer /api/generate on its published port, run unprivileged and stop
cleanly. LLMD_SYSTEM_TEST=0 skips it. Each step prints how long it took.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import tomli_w
from llmdproc import ROOT, free_port

from llmd import config
from llmd.config import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent / "system"))
from machine import cache_dir, rootfs_tarball, step

CONTAINERFILE = ROOT / "deploy/container/Containerfile"
# The build context the Containerfile's header names: the top of the source tree.
CONTEXT = ROOT
CONFIG_IN_IMAGE = "/etc/llmd/llmd.toml"
PORT = "11434"

# --------------------------------------------------------------------------------------------
# A Containerfile parser: enough of the format for the checks, and honest about the rest.


@dataclass(frozen=True)
class Instruction:
    line: int  # of its first physical line
    cmd: str  # upper case
    flags: dict[str, str]  # leading --name=value options
    args: str  # the rest, continuation lines joined

    def exec_form(self) -> list[str] | None:
        """The JSON array form's items, or None for the shell form."""
        if not self.args.startswith("["):
            return None
        try:
            value = json.loads(self.args)
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None

    def words(self) -> list[str]:
        """The arguments as a list: the JSON form's items, else whitespace-separated words."""
        form = self.exec_form()
        return form if form is not None else self.args.split()


@dataclass
class Stage:
    index: int
    name: str | None
    image: str  # FROM's argument with the ARGs expanded to their defaults
    image_raw: str
    line: int
    args: dict[str, str] = field(default_factory=dict)  # ARGs declared in the stage
    instructions: list[Instruction] = field(default_factory=list)

    def last(self, cmd: str) -> Instruction | None:
        found = [i for i in self.instructions if i.cmd == cmd]
        return found[-1] if found else None


def parse(text: str) -> list[Instruction]:
    """The instructions of a Containerfile, in order."""
    if re.match(r"\s*#\s*escape\s*=\s*(?!\\)", text):
        raise ValueError("an escape directive other than '\\' is not supported here")
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        # Comment and blank lines are dropped, even between continuation lines.
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = n
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        out.append(_instruction(start, " ".join(p for p in parts if p)))
        parts = []
    if parts:
        out.append(_instruction(start, " ".join(parts)))
    return out


def _instruction(line: int, logical: str) -> Instruction:
    cmd, _, rest = logical.partition(" ")
    flags: dict[str, str] = {}
    rest = rest.strip()
    while m := re.match(r"--([a-z-]+)(?:=(\S*))?\s*", rest):
        flags[m.group(1)] = m.group(2) or ""
        rest = rest[m.end() :]
    return Instruction(line, cmd.upper(), flags, rest)


def expand(s: str, args: dict[str, str]) -> str:
    """$NAME and ${NAME} replaced by the ARG values (an unknown one by "", as the builders do)."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: args.get(m.group(1) or m.group(2), ""), s)


def _arg(ins: Instruction) -> tuple[str, str | None]:
    name, eq, default = ins.args.partition("=")
    return name.strip(), (default.strip().strip("\"'") if eq else None)


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults (before the first FROM) and the stages."""
    global_args: dict[str, str] = {}
    out: list[Stage] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            out.append(Stage(len(out), name, expand(words[0], global_args), words[0], ins.line))
        elif not out:
            if ins.cmd == "ARG":
                key, default = _arg(ins)
                global_args[key] = default or ""
        else:
            stage = out[-1]
            if ins.cmd == "ARG":
                key, default = _arg(ins)
                stage.args[key] = default if default is not None else global_args.get(key, "")
            stage.instructions.append(ins)
    return global_args, out


def registry_host(image: str) -> str | None:
    """The registry host an image reference names, if any (Docker's rule for the first part)."""
    first, slash, _ = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


def _under(path: str, top: str) -> bool:
    return (
        PurePosixPath(path) == PurePosixPath(top)
        or PurePosixPath(top) in PurePosixPath(path).parents
    )


def image_config(context: Path, stage: Stage) -> dict[str, Any] | None:
    """The llmd config the stage copies to /etc/llmd/llmd.toml, parsed; None if it copies none."""
    for ins in stage.instructions:
        if ins.cmd == "COPY" and "from" not in ins.flags:
            *sources, dest = ins.words()
            if dest == CONFIG_IN_IMAGE and len(sources) == 1:
                return tomllib.loads((context / sources[0]).read_text())
    return None


def check(text: str, context: Path) -> list[str]:
    """What is wrong with the Containerfile `text` built from `context` (empty: nothing)."""
    problems: list[str] = []
    _, all_stages = stages(parse(text))
    if not all_stages:
        return ["no FROM"]
    names: dict[str, int] = {}
    for stage in all_stages:
        for ins in stage.instructions:
            if ins.cmd not in ("COPY", "ADD"):
                continue
            where = f"line {ins.line}: {ins.cmd}"
            if "from" in ins.flags:
                ref = ins.flags["from"]
                earlier = names.get(ref, int(ref) if ref.isdigit() else None)
                if earlier is None or earlier >= stage.index:
                    problems.append(f"{where} --from={ref} names no earlier stage")
                continue
            for source in ins.words()[:-1]:
                if "://" in source:
                    problems.append(f"{where} {source}: a URL is fetched at every build")
                    continue
                if ".." in PurePosixPath(source).parts:
                    problems.append(f"{where} {source}: outside the build context")
                    continue
                if not _exists(context, source):
                    problems.append(f"{where} {source}: no such file in the build context")
        if stage.name:
            names[stage.name] = stage.index

    for stage in all_stages:
        if stage.image_raw in names or stage.image == "scratch":
            continue
        what = f"line {stage.line}: FROM {stage.image_raw}"
        if not stage.image:
            problems.append(f"{what}: the image ARG has no default")
            continue
        if host := registry_host(stage.image):
            problems.append(f"{what} defaults to registry host {host}: use a short name")
        tag = stage.image.rsplit("/", 1)[-1].partition(":")[2]
        if "@" not in stage.image and tag in ("", "latest"):
            problems.append(f"{what} ({stage.image}): pin a version tag")

    final = all_stages[-1]
    user = final.last("USER")
    if user is None:
        problems.append("the final stage sets no USER: it would run as root")
    else:
        # A global ARG is seen in a stage only where the stage declares it again.
        uid = expand(user.args, final.args).partition(":")[0]
        if uid in ("root", "0", ""):
            problems.append(f"line {user.line}: USER {user.args} is root")
        elif not uid.isdigit():
            problems.append(f"line {user.line}: USER {uid}: name the UID (runAsNonRoot)")
    health = final.last("HEALTHCHECK")
    if health is None or health.args.upper() == "NONE":
        problems.append("the final stage has no HEALTHCHECK")
    elif not re.search(rf"[:/]{PORT}/readyz\b", health.args):
        problems.append(f"line {health.line}: the HEALTHCHECK does not ask :{PORT}/readyz")
    exposed = {w.split("/")[0] for i in final.instructions if i.cmd == "EXPOSE" for w in i.words()}
    if PORT not in exposed:
        problems.append(f"the final stage does not EXPOSE {PORT}")
    volumes = [v for i in final.instructions if i.cmd == "VOLUME" for v in i.words()]
    cfg = image_config(context, final)
    if cfg is None:
        problems.append(f"the final stage copies no config to {CONFIG_IN_IMAGE}")
        return problems
    listen = cfg.get("proxy", {}).get("listen", "127.0.0.1:11434")
    if listen not in (f"0.0.0.0:{PORT}", f"[::]:{PORT}"):
        problems.append(f"the image's config listens on {listen}, not on every address:{PORT}")
    backends = cfg.get("backend", [])
    if not backends:
        problems.append("the image's config names no [[backend]] and so no OLLAMA_MODELS")
    for b in backends:
        d = b.get("env", {}).get("OLLAMA_MODELS")
        if d is None:
            problems.append(f"backend {b.get('name')} sets no OLLAMA_MODELS: where do models go?")
        elif not any(_under(d, v) for v in volumes):
            problems.append(f"the models directory {d} is on no VOLUME ({volumes})")
    return problems


def _exists(context: Path, source: str) -> bool:
    path = source.lstrip("/")
    if any(c in path for c in "*?["):
        parent = context / PurePosixPath(path).parent
        return parent.is_dir() and any(
            fnmatch.fnmatch(p.name, PurePosixPath(path).name) for p in parent.iterdir()
        )
    return (context / path).exists()


# --------------------------------------------------------------------------------------------
# The lint.


def test_parser_joins_continuations_and_drops_comments() -> None:
    """A continued instruction is one instruction, comment lines inside it are skipped."""
    text = (
        "# syntax comment\nARG A=1\nFROM base:${A} AS one\n"
        "RUN echo a \\\n    # a comment inside\n    && echo b\n"
        "COPY --from=one --chown=1:1 /x /y\n"
    )
    got = parse(text)
    assert [i.cmd for i in got] == ["ARG", "FROM", "RUN", "COPY"]
    assert got[2].args == "echo a && echo b"
    assert got[2].line == 4
    assert got[3].flags == {"from": "one", "chown": "1:1"}
    _, (stage,) = stages(got)
    assert (stage.name, stage.image) == ("one", "base:1")


def test_containerfile_passes_its_checks() -> None:
    """The shipped Containerfile has every COPY source, stage and runtime setting it needs."""
    assert check(CONTAINERFILE.read_text(), CONTEXT) == []


def test_base_images_are_short_pinned_names() -> None:
    """Base images are ARGs whose defaults are short names with a version tag."""
    args, all_stages = stages(parse(CONTAINERFILE.read_text()))
    assert args["OLLAMA_IMAGE"].startswith("ollama/ollama:")
    assert args["BASE_IMAGE"].startswith("debian:12")
    assert [s.image_raw for s in all_stages if s.name != "deb"] == [
        "${OLLAMA_IMAGE}",
        "${BASE_IMAGE}",
    ]


# Each mutation of the real Containerfile (a regex and its replacement, applied once) and a piece
# of the problem the check must report.
MUTATIONS = [
    (r"COPY llmd/ llmd/", "COPY llmd-gone/ llmd/", "llmd-gone/: no such file"),
    (r"--from=deb\b", "--from=debs", "--from=debs names no earlier stage"),
    (r"--from=ollama\b", "--from=9", "--from=9 names no earlier stage"),
    (r"USER \$\{LLMD_UID\}", "USER root", "is root"),
    (r"USER \$\{LLMD_UID\}", "USER llmd", "name the UID"),
    (r"11434/readyz", "11434/healthz", "does not ask :11434/readyz"),
    (r"EXPOSE 11434", "EXPOSE 8080", "does not EXPOSE 11434"),
    (r'VOLUME \["/var/lib/llmd"\]', 'VOLUME ["/var/cache/llmd"]', "is on no VOLUME"),
    (r"COPY deploy/container/llmd.toml", "COPY etc/llmd.toml", "127.0.0.1"),
    (r"^ARG BASE_IMAGE=", "ARG BASE_IMAGE=registry.example:5000/", "registry host"),
    (r"^ARG OLLAMA_IMAGE=.*", "ARG OLLAMA_IMAGE=ollama/ollama", "pin a version tag"),
    (r"^ARG OLLAMA_IMAGE=.*", "ARG OLLAMA_IMAGE=ollama/ollama:latest", "pin a version tag"),
]


@pytest.mark.parametrize(("old", "new", "problem"), MUTATIONS, ids=[m[1] for m in MUTATIONS])
def test_check_catches(old: str, new: str, problem: str) -> None:
    """Each check reports the fault it is for, naming it."""
    text = CONTAINERFILE.read_text()
    mutated, n = re.subn(old, new, text, count=1, flags=re.MULTILINE)
    assert n == 1, f"{old!r} is no longer in the Containerfile"
    problems = check(mutated, CONTEXT)
    assert any(problem in p for p in problems), problems


def test_healthcheck_program_compiles() -> None:
    """The HEALTHCHECK's python3 program compiles (a syntax error would read as unhealthy)."""
    _, all_stages = stages(parse(CONTAINERFILE.read_text()))
    health = all_stages[-1].last("HEALTHCHECK")
    assert health is not None
    argv = Instruction(health.line, "CMD", {}, health.args.removeprefix("CMD").strip()).exec_form()
    assert argv is not None and argv[:2] == ["python3", "-c"], health.args
    compile(argv[2], "HEALTHCHECK", "exec")


def test_image_config_is_refused_without_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's default config listens on every interface, and llmd refuses it without
    keys; with a key it is valid."""
    monkeypatch.delenv("LLMD_API_KEYS", raising=False)
    monkeypatch.delenv("LLMD_INFERENCE_KEYS", raising=False)
    shipped = ROOT / "deploy/container/llmd.toml"
    with pytest.raises(ConfigError, match=r"proxy\.listen"):
        config.load(shipped)
    doc = tomllib.loads(shipped.read_text())
    doc["proxy"]["api_keys"] = ["a-key-of-some-length"]
    keyed = tmp_path / "llmd.toml"
    keyed.write_text(tomli_w.dumps(doc))
    cfg = config.load(keyed)
    assert cfg.proxy.listen == f"0.0.0.0:{PORT}"
    assert str(cfg.daemon.admin_socket) == "/run/llmd/admin.sock"


# --------------------------------------------------------------------------------------------
# Build and run, with podman.

TEST_CONFIG = """\
[daemon]
state_dir = "/var/lib/llmd"
admin_socket = "/run/llmd/admin.sock"
log_level = "debug"
shutdown_timeout = "10s"

[proxy]
listen = "0.0.0.0:11434"
allow_unauthenticated = true

[[backend]]
name = "default"
port = 11435
command = ["ollama", "serve"]
stop_timeout = "5s"
env = { OLLAMA_MODELS = "/var/lib/llmd/models", OLLAMA_SIM_SPEED = "50" }

[[model]]
name = "tiny:1m"
"""
# Ollama's image as the Containerfile uses it: /usr/bin/ollama and /usr/lib/ollama.
FAKE_OLLAMA = """\
FROM scratch
COPY ollama /usr/bin/ollama
COPY sim/ /usr/lib/ollama/
"""
SIM_GPU = {"devices": [{"index": 0, "name": "NVIDIA GeForce RTX 4090", "total_mib": 24564}]}


def _build_skip_reason() -> str | None:
    if os.environ.get("LLMD_SYSTEM_TEST") == "0":
        return "LLMD_SYSTEM_TEST=0"
    if os.geteuid() != 0:
        return "needs root (podman with a private store)"
    missing = [t for t in ("podman", "debootstrap") if shutil.which(t) is None]
    if missing:
        return f"needs {' and '.join(missing)} (apt-get install podman runc debootstrap)"
    return None


class Podman:
    """podman on a throwaway store under `top`: nothing is left behind by the test."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.runtime: list[str] = []
        self.driver = "overlay"
        # Podman's default limits (nofile 1048576...) cannot be set without CAP_SYS_RESOURCE,
        # which a sandboxed root may lack: ask for what this process has.
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.ulimits = [f"--ulimit=nofile={nofile[0]}:{nofile[1]}", "--ulimit=nproc=4096:4096"]

    def argv(self, *args: str) -> list[str]:
        return [
            "podman",
            f"--root={self.top}/storage",
            f"--runroot={self.top}/run",
            f"--tmpdir={self.top}/tmp",
            f"--storage-driver={self.driver}",
            *self.runtime,
            *args,
        ]

    def run(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {r.returncode}\n"
                f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
            )
        return r

    def close(self) -> None:
        self.run("rm", "--all", "--force", "--time=0", check=False, timeout=60)
        self.run("system", "reset", "--force", check=False, timeout=120)
        shutil.rmtree(self.top, ignore_errors=True)


def _last_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = (r.stderr or r.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {r.returncode}"


def _setup(podman: Podman) -> str | None:
    """Import the base image and find a storage driver and runtime that work here; why not."""
    tarball = rootfs_tarball(cache_dir())
    with step("podman import the cached bookworm rootfs"):
        r = podman.run("import", str(tarball), "localhost/llmd-test-base", check=False)
        if r.returncode != 0:
            podman.close()
            podman.driver = "vfs"
            r = podman.run("import", str(tarball), "localhost/llmd-test-base", check=False)
    if r.returncode != 0:
        return f"podman import fails with overlay and vfs storage: {_last_line(r)}"
    # crun refuses a host with hybrid cgroups (v1 controllers beside v2); runc does not.
    tried = []
    for runtime in ([], ["--runtime=runc"]):
        if runtime and shutil.which("runc") is None:
            tried.append("runc: not installed (apt-get install runc)")
            continue
        podman.runtime = runtime
        r = podman.run(
            "run", "--rm", *podman.ulimits, "localhost/llmd-test-base", "true", check=False
        )
        if r.returncode == 0:
            used = runtime[0] if runtime else "default runtime"
            print(f"[system] podman: {podman.driver} storage, {used}", file=sys.stderr)
            return None
        tried.append(f"{runtime[0] if runtime else 'default runtime'}: {_last_line(r)}")
    return "podman cannot run a container here: " + "; ".join(tried)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Podman, str]]:
    """The real Containerfile built on the cached rootfs with the simulator as Ollama."""
    if reason := _build_skip_reason():
        pytest.skip(reason)
    top = tmp_path_factory.mktemp("podman")
    podman = Podman(top / "store")
    try:
        if reason := _setup(podman):
            pytest.skip(reason)
        fake = top / "ollama-image"
        shutil.copytree(
            ROOT / "tests/sim", fake / "sim", ignore=shutil.ignore_patterns("__pycache__")
        )
        (fake / "ollama").write_text('#!/bin/sh\nexec python3 /usr/lib/ollama/ollama "$@"\n')
        (fake / "ollama").chmod(0o755)
        (fake / "Containerfile").write_text(FAKE_OLLAMA)
        podman.run("build", "--tag=localhost/llmd-test-ollama", str(fake))
        tag = "localhost/llmd-test:latest"
        with step("podman build deploy/container/Containerfile"):
            podman.run(
                "build",
                "--format=docker",
                *podman.ulimits,
                f"--file={CONTAINERFILE}",
                "--build-arg=BASE_IMAGE=localhost/llmd-test-base",
                "--build-arg=OLLAMA_IMAGE=localhost/llmd-test-ollama",
                f"--tag={tag}",
                str(CONTEXT),
                timeout=600,
            )
        size = int(podman.run("image", "inspect", "--format={{.Size}}", tag).stdout)
        print(f"[system] image size: {size / 1e6:.0f} MB", file=sys.stderr)
        yield podman, tag
    finally:
        with step("podman: remove the store"):
            podman.close()


def inspect(podman: Podman, kind: str, what: str, fmt: str) -> Any:
    """A field of `podman image|container inspect`, decoded from JSON."""
    return json.loads(podman.run(kind, "inspect", f"--format={fmt}", what).stdout)


@pytest.mark.system
def test_image_metadata(image: tuple[Podman, str]) -> None:
    """The built image runs tini then llmd as a numeric non-root user, exposes 11434, keeps a
    /readyz HEALTHCHECK (docker format) and declares the state volume."""
    podman, tag = image
    cfg = inspect(podman, "image", tag, "{{json .Config}}")
    assert cfg["Entrypoint"] == ["tini", "--", "llmd"]
    assert cfg["User"].isdigit() and cfg["User"] != "0"
    assert f"{PORT}/tcp" in cfg["ExposedPorts"]
    assert "/var/lib/llmd" in cfg["Volumes"]
    health = inspect(podman, "image", tag, "{{json .HealthCheck}}")
    assert any("/readyz" in part for part in health["Test"]), health


@pytest.mark.system
def test_default_config_refuses_to_start_without_keys(image: tuple[Podman, str]) -> None:
    """Run with no config of one's own, the container exits 78 (EX_CONFIG) saying why."""
    podman, tag = image
    r = podman.run("run", "--rm", *podman.ulimits, tag, check=False, timeout=60)
    assert r.returncode == 78, r.stderr
    assert "proxy.listen" in r.stderr and "0.0.0.0:11434" in r.stderr


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.system
def test_runs_serves_and_stops(image: tuple[Podman, str], tmp_path: Path) -> None:
    """With a config allowing no keys, the container turns healthy, answers /api/generate on
    its published port from the simulated model, runs everything unprivileged under tini, and
    stops cleanly (exit 0) well within the stop timeout."""
    podman, tag = image
    uid = int(inspect(podman, "image", tag, "{{json .Config.User}}"))
    conf = tmp_path / "llmd.toml"
    conf.write_text(TEST_CONFIG)
    # The NVIDIA Container Toolkit puts nvidia-smi on PATH; here it is the simulator's.
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\nexec python3 /usr/lib/ollama/nvidia-smi "$@"\n')
    smi.chmod(0o755)
    # The simulators lock and replace the GPU file: its directory must be the llmd user's.
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "gpu.json").write_text(json.dumps(SIM_GPU))
    for p in (sim, sim / "gpu.json"):
        os.chown(p, uid, uid)
    # The image's HEALTHCHECK command, run as a runtime runs it (exec in the container). Not
    # `podman healthcheck run`: that needs the container run with a healthcheck timer, which
    # podman makes as a systemd unit calling podman without this test's private store.
    test = inspect(podman, "image", tag, "{{json .HealthCheck.Test}}")
    assert test[0] == "CMD", test
    probe = test[1:]
    port = free_port()
    name = f"llmd-test-{os.getpid()}"
    start = time.monotonic()
    podman.run(
        "run",
        "--detach",
        f"--name={name}",
        "--no-healthcheck",
        *podman.ulimits,
        f"--publish=127.0.0.1:{port}:{PORT}",
        f"--volume={conf}:{CONFIG_IN_IMAGE}:ro",
        f"--volume={smi}:/usr/local/bin/nvidia-smi:ro",
        f"--volume={sim}:/sim",
        "--env=OLLAMA_SIM_GPU=/sim/gpu.json",
        tag,
    )

    def logs() -> str:
        r = podman.run("logs", name, check=False)
        return (r.stdout + r.stderr)[-6000:]

    try:
        with step("podman run until the HEALTHCHECK passes"):
            deadline = time.monotonic() + 60
            while podman.run("exec", name, *probe, check=False).returncode != 0:
                assert time.monotonic() < deadline, f"never healthy\n{logs()}"
                time.sleep(0.3)
        print(f"[system] healthy {time.monotonic() - start:.1f}s after run", file=sys.stderr)
        assert _ready(f"http://127.0.0.1:{port}/readyz"), logs()

        body = json.dumps({"model": "tiny:1m", "prompt": "hello", "stream": False}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/generate", data=body)
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.loads(r.read())
        assert answer["done"] is True and answer["response"], answer

        assert podman.run("exec", name, "id", "-u").stdout.strip() == str(uid)
        assert podman.run("exec", name, "cat", "/proc/1/comm").stdout.strip() == "tini"
        users = podman.run("top", name, "user", "args").stdout.splitlines()[1:]
        assert any("ollama serve" in u for u in users), users
        assert all(u.split()[0] == "llmd" for u in users), users
        status = json.loads(podman.run("exec", name, "llmctl", "status", "--json").stdout)
        assert [b["state"] for b in status["backends"]] == ["running"], status

        with step("podman stop"):
            t0 = time.monotonic()
            podman.run("stop", "--time=30", name, timeout=60)
            took = time.monotonic() - t0
        state = inspect(podman, "container", name, "{{json .State}}")
        assert state["ExitCode"] == 0, logs()
        assert took < 15, f"stop took {took:.1f}s\n{logs()}"
        out = logs()
        assert "SIGTERM: shutting down" in out and "llmd stopped" in out, out
    finally:
        podman.run("rm", "--force", "--time=0", name, check=False, timeout=60)
