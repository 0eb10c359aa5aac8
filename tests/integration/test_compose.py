"""docker-compose.yml and the Dockerfile, proven as far as a machine without a Docker engine allows.

* ``docker-compose config`` (Debian's docker-compose 1.29, installed by ``make test``) validates the file for
  each profile, and refuses a broken copy (so the check can fail).
* The Dockerfile installs with the step ``make venv`` runs (``.ci/install-venv``); its image has the promised
  shape (two stages, only the venv copied over, no compiler, a user without privileges).
* The services run as local processes, each with its compose command line exactly and the image's environment plus
  its own (nothing inherited from pytest): the Dockerfile's build stage is replayed first, as ``docker build
  --build-arg VENV=<a temporary directory>`` would run it, and that venv is the image's. Each container is a
  process in its own UTS and mount namespaces: its host name is twelve hex digits like a container ID (the VMs'
  partition names come from it), its named volumes are bind-mounted at their container paths, its ``secrets:``
  read-only at ``/run/secrets/NAME`` (compose without swarm bind-mounts the host file, made first with ``make
  compose-secrets`` as the README says), and a private ``/etc/hosts`` names ``parent`` (what compose's DNS does).
  Each has a network namespace of its own on a bridge, as on a compose network (link-local addresses, in
  namespaces deleted afterwards). The parent's healthcheck runs inside the parent's namespaces (``nsenter``, as
  ``docker exec`` does), and the VMs start once it passes (``service_healthy``); the web console's port is reached
  inside the parent's network namespace, where Docker would publish it, with the token of ``secrets/http.key``.
  The TAP profile runs too: its containers' kernels ping the other VMs through the parent's switch. Differences
  from a real engine: everything runs as root here (the image runs as ``vmbus``; the TAP service is root in its
  container anyway), the working directory is a temporary one, and the tools (``ip``, ``ping``, ``arping``) are
  this machine's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from child_partition.devices.network.stack import address_for_name

from .netns import Netns, namespace, run, tap_unavailable, unavailable

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
# What the python image's own environment holds (its Dockerfile's ENV), under the project image's ENV lines.
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
DEADLINE = 180.0  # seconds for the VMs to do what is checked (a loaded 2-core machine)


def compose_file() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def interpolate(text: str) -> str:
    """Compose's variable substitution for this file: ``$$`` is a literal ``$``; it uses no variables."""
    assert not re.search(r"(?<!\$)\$(?!\$)", text.replace("$$", "")), f"unexpected variable in {text!r}"
    return text.replace("$$", "$")


def docker_compose(*args: str, file: Path = COMPOSE) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: apt-get install docker-compose (make test installs it)")
    return subprocess.run(["docker-compose", "-f", str(file), *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=REPO)


# -- docker-compose config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", [None, "unix", "tap"])
def test_docker_compose_config_accepts_the_file(profile: str | None) -> None:
    done = docker_compose(*(["--profile", profile] if profile else []), "config")
    assert done.returncode == 0, f"docker-compose config failed: {done.stderr.strip()}"
    config = yaml.safe_load(done.stdout)
    assert config["services"]["vm"]["deploy"]["replicas"] == 3, "the vm service lost its 3 replicas"
    assert "container_name" not in json.dumps(config), "a container_name would stop the vm service from scaling"


def test_docker_compose_config_refuses_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("replicas: 3", "replicas: three", 1))
    done = docker_compose("config", file=broken)
    assert done.returncode != 0 and "replicas" in done.stderr, f"a broken file passed: {done.stderr.strip()}"


# -- the Dockerfile --------------------------------------------------------------------------------------------

@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)  # (instruction, its arguments)


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs and the stages, line continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                             if not line.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in filter(None, (x.strip() for x in text.splitlines())):
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = rest.split()
            stages.append(Stage(words[0], words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        elif stages:
            stages[-1].steps.append((instruction, rest.strip()))
        elif instruction == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
    return args, stages


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)


def install_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "install-venv" in line or "pip install" in line]


def test_the_image_installs_with_the_step_make_venv_runs() -> None:
    _, stages = dockerfile()
    runs = [rest for stage in stages for instruction, rest in stage.steps if instruction == "RUN"]
    installs = [r for r in runs if "install-venv" in r or "pip " in r]
    assert installs == [".ci/install-venv ${VENV} ."], f"the Dockerfile installs otherwise: {installs}"
    made = subprocess.run(["make", "-n", "venv", "VENV=/tmp/the-venv"], capture_output=True, text=True, cwd=REPO,
                          timeout=60, check=True).stdout
    expected = [".ci/install-venv /tmp/the-venv -e .", ".ci/install-venv /tmp/the-venv -e '.[dev]'"]
    assert install_lines(made) == expected, f"make venv installs otherwise: {install_lines(made)}"
    assert "pip install" not in (REPO / "Makefile").read_text(), "the Makefile has a pip install of its own"
    readme = (REPO / "README.md").read_text()
    assert "make venv" in readme and "pip install -e '.[dev]'" in readme, \
        "the README's install step is no longer make venv (or its pip equivalent)"


def test_the_image_is_two_stages_non_root_without_build_tools() -> None:
    _, stages = dockerfile()
    assert len(stages) == 2 and stages[0].name == "build", "expected a build stage and a final stage"
    final = stages[1]
    copies = [rest for instruction, rest in final.steps if instruction == "COPY"]
    assert copies == ["--from=build ${VENV} ${VENV}"], f"the final stage copies more than the venv: {copies}"
    packages = " ".join(rest for instruction, rest in final.steps if instruction == "RUN" and "apt-get" in rest)
    for wanted in ("fonts-dejavu-core", "iproute2", "iputils-ping", "iputils-arping", "--no-install-recommends"):
        assert wanted in packages, f"the final stage does not install {wanted}"
    for tool in ("gcc", "build-essential", "make ", "-dev"):
        assert tool not in packages, f"the final stage installs a build tool: {tool}"
    users = [rest for instruction, rest in final.steps if instruction == "USER"]
    assert users and users[-1] not in ("root", "0"), f"the image runs as root: {users}"
    ignored = (REPO / ".dockerignore").read_text().split()
    for kept_out in (".git", ".venv/", "var/", "run/", "bench/results/", "**/__pycache__/", "secrets/"):
        assert kept_out in ignored, f".dockerignore does not keep {kept_out} out"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The Dockerfile's build stage replayed here with VENV in a temporary directory; returns the final stage's
    environment (its ENV lines over the python image's)."""
    args, (build, final) = dockerfile()
    root = tmp_path_factory.mktemp("image")
    values = {**args, "VENV": str(root / "venv")}
    env = dict(os.environ)
    cwd = root
    for instruction, rest in build.steps:
        if instruction == "ARG":
            key, _, value = rest.partition("=")
            values.setdefault(key, value)  # --build-arg VENV=... wins over the default
        elif instruction == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(expand(rest, values)))
        elif instruction == "WORKDIR":
            cwd = root / rest.lstrip("/")
            cwd.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, dest = rest.split()
            for src in sources:
                target = cwd / dest / Path(src).name if dest.endswith("/") else cwd / dest
                if (REPO / src).is_dir():
                    shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / src, target)
        elif instruction == "RUN":
            done = subprocess.run(["sh", "-c", expand(rest, values)], cwd=cwd, env=env, capture_output=True,
                                  text=True, timeout=900, check=False)
            assert done.returncode == 0, f"the build stage's RUN {rest} failed: {done.stderr.strip()[-2000:]}"
        else:
            pytest.fail(f"the replay of the build stage does not know {instruction}")
    final_env = dict(BASE_ENV)
    for instruction, rest in final.steps:
        if instruction == "ARG":
            values.setdefault(*rest.split("=", 1))
        elif instruction == "ENV":
            final_env.update(kv.split("=", 1) for kv in shlex.split(expand(rest, {**values, **final_env})))
    yield final_env


# -- the services as processes ------------------------------------------------------------------------------------

def container_id() -> str:
    """A host name as Docker gives a container: the first 12 hex digits of its ID."""
    return secrets.token_hex(6)


class ComposeNetwork:
    """The compose network as Docker makes it: a bridge (in a namespace of its own), and each container in its
    own network namespace with an ``eth0`` on that bridge. Link-local addresses (169.254.77.0/24): nothing
    leaves the namespaces, which are deleted afterwards, also when a test fails."""

    SUBNET = "169.254.77"

    def __init__(self, stack: contextlib.ExitStack) -> None:
        reason = unavailable()
        if reason is not None:
            pytest.fail(reason)
        self._stack = stack
        self.bridge = stack.enter_context(namespace("vmbcb"))
        self.bridge.ip("link", "add", "br0", "type", "bridge")
        self.bridge.ip("link", "set", "br0", "up")
        self.hosts: dict[str, str] = {}  # service name -> address, what compose's DNS answers
        self._next = 2

    def join(self) -> tuple[Netns, str]:
        """A new container's network namespace, joined to the bridge; returns it and its address."""
        ns = self._stack.enter_context(namespace("vmbc"))
        port = f"vmbcp{secrets.token_hex(4)}"
        run(["ip", "link", "add", port, "netns", self.bridge.name, "type", "veth", "peer", "name", "eth0",
             "netns", ns.name])
        self.bridge.ip("link", "set", port, "master", "br0", "up")
        address = f"{self.SUBNET}.{self._next}"
        self._next += 1
        ns.address("eth0", f"{address}/24")
        return ns, address


class Container:
    """One service's container as a process: its own network (on the compose network), UTS and mount
    namespaces, the service's sysctls, its named volumes at their container paths, ``/etc/hosts`` naming the
    services."""

    def __init__(self, service: str, spec: dict[str, Any], image_env: dict[str, str], network: ComposeNetwork,
                 volumes: dict[str, Path], secret_files: dict[str, Path], workdir: Path) -> None:
        self.service = service
        self.hostname = container_id()
        self.command = [interpolate(str(a)) for a in spec["command"]]
        environment = spec.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(e.split("=", 1) for e in environment)
        self.env = {**image_env, "HOSTNAME": self.hostname, **{k: interpolate(str(v)) for k, v in environment.items()}}
        home = workdir / f"{service}-{self.hostname}"
        home.mkdir(parents=True)
        self.env["HOME"] = str(home)
        self.ns, self.address = network.join()
        network.hosts.setdefault(service, self.address)
        for key, value in (spec.get("sysctls") or {}).items():
            self.ns.run(["sysctl", "-q", "-w", f"{key}={value}"])
        hosts = home / "hosts"
        hosts.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n" + f"{self.address}\t{self.hostname}\n" +
                         "".join(f"{address}\t{name}\n" for name, address in network.hosts.items()))
        setup = [f"hostname {self.hostname}", f"mount --bind {hosts} /etc/hosts"]
        # (host path, container path): the named volumes, then the secrets (read-only files)
        self.mounts = {Path(m.split(":")[1]): volumes[m.split(":")[0]] for m in spec.get("volumes", [])}
        secret_mounts = dict(secret_mount(s, secret_files) for s in spec.get("secrets", []))
        covered: set[Path] = set()
        for where, source in {**self.mounts, **secret_mounts}.items():
            ancestor = next(p for p in (where, *where.parents) if p.exists() or p in covered)
            if ancestor != where and ancestor not in covered:  # a private tmpfs to make the mount point in
                setup.append(f"mount -t tmpfs tmpfs {ancestor}")
                covered.add(ancestor)
            if where in secret_mounts:
                setup += [f"mkdir -p {where.parent}", f"touch {where}", f"mount --bind -o ro {source} {where}"]
            else:
                setup += [f"mkdir -p {where}", f"mount --bind {source} {where}"]
        self.mounts.update(secret_mounts)
        script = " && ".join(setup) + ' && exec "$@"'
        self.log = home / "log"
        argv = self.ns.argv(["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script, "sh",
                             *self.command])
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(argv, cwd=home, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self, event: str) -> list[str]:
        """The log lines of ``event`` for this container's partition (console format: ``... [info] event k=v``)."""
        return [line for line in self.text().splitlines()
                if re.search(rf"\] {re.escape(event)}\s", line) and f"partition={self.hostname}" in line]

    def exec(self, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``docker exec``: run ``argv`` in this container's namespaces with its environment."""
        return subprocess.run(["nsenter", "--target", str(self.proc.pid), "--mount", "--uts", "--net", "--", *argv],
                              env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def stop(self, timeout: float = 60.0) -> int | None:
        """``docker stop``: SIGTERM, then SIGKILL after the grace period; the exit status (None if killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return None
        return self.proc.returncode


def secret_mount(entry: str | dict[str, Any], secret_files: dict[str, Path]) -> tuple[Path, Path]:
    """A service's ``secrets:`` entry (short syntax, or long with ``source``/``target``) as compose mounts it:
    (its path in the container, the host file)."""
    source = entry if isinstance(entry, str) else entry["source"]
    target = source if isinstance(entry, str) else entry.get("target", source)
    assert source in secret_files, f"secret {source} is not in the compose file's top-level secrets"
    return Path("/run/secrets") / target, secret_files[source]


def make_secrets(project: Path) -> dict[str, Path]:
    """The README's one-time step (``make compose-secrets``) in ``project``; returns the compose file's top-level
    secrets resolved there (``file:`` is relative to the project directory)."""
    secrets_dir = project / "secrets"
    subprocess.run(["make", "-s", "compose-secrets", f"SECRETS={secrets_dir}"], cwd=REPO, check=True, timeout=60,
                   capture_output=True, text=True)
    files = {name: (project / spec["file"]).resolve() for name, spec in compose_file()["secrets"].items()}
    for name, path in files.items():
        assert path.is_file(), f"make compose-secrets did not make {path}, the file of secret {name}"
        assert path.stat().st_mode & 0o004, f"{path} is not readable by the image's user through compose's bind mount"
    assert not secrets_dir.stat().st_mode & 0o077, f"{secrets_dir} lets other users in"
    return files


def wait_for(cond: Callable[[], bool], what: Callable[[], str], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what()}")
        time.sleep(0.25)


def wait_healthy(parent: Container, healthcheck: dict[str, Any]) -> None:
    """Run the healthcheck's test in the parent's namespaces until it passes, as the engine does before it
    starts the services that depend on ``service_healthy``."""
    test = [interpolate(str(a)) for a in healthcheck["test"]]
    argv = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
    last: list[subprocess.CompletedProcess[str]] = []

    def healthy() -> bool:
        assert parent.proc.poll() is None, f"the parent exited with {parent.proc.returncode}: {parent.text()[-2000:]}"
        last[:] = [parent.exec(argv)]
        return last[0].returncode == 0

    wait_for(healthy, lambda: f"the parent's healthcheck ({last[0].stderr.strip() if last else 'never ran'})")
    assert "negotiated with the parent" in last[0].stdout, last[0].stdout


def api_token(parent: Container) -> str:
    """The token of the parent's ``--http-token-file``, read from the host file mounted there."""
    path = Path(parent.command[parent.command.index("--http-token-file") + 1])
    return parent.mounts[path].read_text().strip()


def api_partitions(parent: Container) -> list[dict[str, Any]]:
    """GET /api/partitions on the parent's published port (127.0.0.1:8080 in its network namespace), with its
    token."""
    python = str(Path(parent.env["PATH"].split(":")[0]) / "python")
    fetch = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(urllib.request.Request("
             "sys.argv[1], headers={'Authorization': 'Bearer ' + sys.argv[2]}), timeout=10).read().decode())")
    done = parent.ns.run([python, "-c", fetch, "http://127.0.0.1:8080/api/partitions", api_token(parent)],
                         check=False)
    if done.returncode != 0:
        return []
    doc: list[dict[str, Any]] = json.loads(done.stdout)
    return doc


@contextlib.contextmanager
def compose_up(tmp_path: Path, image_env: dict[str, str], replicas: dict[str, int | None]) -> Iterator[
        tuple[Container, dict[str, list[Container]]]]:
    """``docker compose up`` of the parent, then (once it is healthy) each service of ``replicas`` with that
    many containers (None: its ``deploy.replicas``); ``down`` on exit."""
    doc = compose_file()
    services = doc["services"]
    volumes = {name: tmp_path / "volumes" / name for name in doc["volumes"]}
    for path in volumes.values():
        path.mkdir(parents=True)
    secret_files = make_secrets(tmp_path / "project")
    started: list[Container] = []
    with contextlib.ExitStack() as stack:
        network = ComposeNetwork(stack)
        try:
            parent = Container("parent", services["parent"], image_env, network, volumes, secret_files, tmp_path)
            started.append(parent)
            wait_healthy(parent, services["parent"]["healthcheck"])
            vms: dict[str, list[Container]] = {}
            for service, count in replicas.items():
                spec = services[service]
                assert spec["depends_on"]["parent"]["condition"] == "service_healthy", f"{service} starts early"
                vms[service] = [Container(service, spec, image_env, network, volumes, secret_files, tmp_path)
                                for _ in range(count or spec["deploy"]["replicas"])]
                started += vms[service]
            yield parent, vms
        finally:
            for c in reversed(started):
                c.stop()


def wait_channels_open(vms: list[Container]) -> None:
    for vm in vms:
        wait_for(lambda vm=vm: bool(vm.lines("all offered channels open")) or vm.proc.poll() is not None,
                 lambda vm=vm: f"{vm.hostname} to open its channels; its log ends: {vm.text()[-1500:]}")
        assert vm.proc.poll() is None, f"{vm.hostname} exited with {vm.proc.returncode}: {vm.text()[-1500:]}"


def wait_ping_replies(vm: Container, others: list[Container], replied: Callable[[Container, str], bool]) -> None:
    for other in others:
        if other is not vm:
            address = str(address_for_name(other.hostname).ip)
            wait_for(lambda a=address: replied(vm, a),
                     lambda o=other: f"{vm.service} {vm.hostname} to get a ping reply from {o.service} {o.hostname}; "
                                     f"its last lines: {vm.text()[-1500:]}")


def builtin_replied(vm: Container, address: str) -> bool:
    """A ``ping reply`` of the built-in stack's ``--ping neighbours`` from ``address``."""
    return any(f"address={address} " in line for line in vm.lines("ping reply"))


def kernel_replied(vm: Container, address: str) -> bool:
    """A reply line of iputils ping in the TAP variant's loop."""
    return f"bytes from {address}: icmp_seq=" in vm.text()


def check_the_demo(parent: Container, vms: list[Container]) -> None:
    """What a person watching ``docker compose up`` sees: every VM up with all its channels open, pinging
    every other VM, writing to its disk, drawing its console, and listed by the web console's API."""
    wait_channels_open(vms)
    for vm in vms:
        wait_ping_replies(vm, vms, builtin_replied)
        wait_for(lambda vm=vm: any("verified=True" in line for line in vm.lines("disk write")),
                 lambda vm=vm: f"{vm.hostname} to write to its disk and read it back: {vm.text()[-1500:]}")
        assert vm.lines("console drawn"), f"{vm.hostname} drew no console: {vm.text()[-1500:]}"
    names = {vm.hostname for vm in vms}
    seen: list[dict[str, Any]] = []

    def listed() -> bool:
        seen[:] = [p for p in api_partitions(parent) if p["name"] in names]
        return len(seen) == len(names) and all(c["state"] == "open" for p in seen for c in p["channels"])

    wait_for(listed, lambda: f"/api/partitions to list {sorted(names)} with every channel open: {seen}")
    assert all(len(p["channels"]) >= 6 for p in seen), f"a VM has fewer than the 6 devices' channels: {seen}"
    for c in (parent, *vms):
        text = c.text()
        assert "\x1b[" not in text, f"{c.service} {c.hostname} logs colours into a file: {text[:300]}"
        assert not any(line.startswith("{") for line in text.splitlines()), \
            f"{c.service} {c.hostname} logs JSON lines by default: {text[:300]}"


def check_clean_stop(parent: Container, vms: list[Container]) -> None:
    """``docker compose down``: every VM unloads cleanly (status 0), then the parent stops (status 0)."""
    for vm in vms:
        status = vm.stop()
        assert status == 0 and vm.lines("unloaded cleanly"), \
            f"{vm.service} {vm.hostname} did not unload cleanly (status {status}): {vm.text()[-1500:]}"
    status = parent.stop()
    assert status == 0, f"the parent stopped with status {status}: {parent.text()[-1500:]}"


@pytest.mark.timeout(1200)
def test_compose_up_runs_the_demo(tmp_path: Path, image: dict[str, str]) -> None:
    """``docker compose up``: the parent, its healthcheck, three ``vm`` replicas over TCP to ``parent``."""
    with compose_up(tmp_path, image, {"vm": None}) as (parent, vms):
        assert len(vms["vm"]) == 3
        check_the_demo(parent, vms["vm"])
        # The healthcheck says no where no VMBus parent answers (the web console's port is HTTP).
        done = parent.exec(["child-partition", "probe", "--connect", "tcp://127.0.0.1:8080", "--timeout", "5"])
        assert done.returncode == 1 and "does not serve VMBus" in done.stderr, done.stderr
        check_clean_stop(parent, vms["vm"])


@pytest.mark.timeout(1200)
def test_compose_unix_profile_runs_the_demo(tmp_path: Path, image: dict[str, str]) -> None:
    """``docker compose --profile unix up --scale vm=0``: the ``vm-unix`` replicas over the Unix socket in the
    shared volume."""
    with compose_up(tmp_path, image, {"vm-unix": None}) as (parent, vms):
        check_the_demo(parent, vms["vm-unix"])
        check_clean_stop(parent, vms["vm-unix"])


@pytest.mark.timeout(1200)
def test_compose_tap_profile_kernels_ping_through_the_switch(tmp_path: Path, image: dict[str, str]) -> None:
    """``docker compose --profile tap up --scale vm=2``: two VMs with the built-in stack and the two ``vm-tap``
    replicas, whose containers' kernels are their guests' network stacks; every VM gets ping replies from
    every other, kernel or built-in, through the parent's virtual switch."""
    if (reason := tap_unavailable()) is not None:
        pytest.fail(reason)
    with compose_up(tmp_path, image, {"vm": 2, "vm-tap": None}) as (parent, vms):
        builtin, tap = vms["vm"], vms["vm-tap"]
        wait_channels_open(builtin + tap)
        for vm in tap:
            assert vm.lines("TAP bridged to the NIC"), f"{vm.hostname}'s TAP was not bridged: {vm.text()[-1500:]}"
        for vm in builtin:
            wait_ping_replies(vm, builtin + tap, builtin_replied)
        for vm in tap:
            wait_ping_replies(vm, builtin + tap, kernel_replied)
        check_clean_stop(parent, builtin + tap)
