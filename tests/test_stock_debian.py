"""The README's two commands on a stock Debian, whose own python3 is "externally managed"
(PEP 668: its pip refuses to install outside a virtual environment). `make run` and `make test`
must make the project's .venv, install into it and run from it, with nothing on PATH but the
system's python3:

* here, on a copy of the repository with PATH=/usr/sbin:/usr/bin:/sbin:/bin, so that `python3`
  is Debian's /usr/bin/python3: `make run` answers /healthz from .venv, a second `make run`
  reuses .venv without pip, and `make test` runs pytest from .venv;
* in a Debian 12 made with debootstrap (minbase with python3 and make, without python3-venv),
  chrooted into: the same, and the install step adds Debian's venv package itself.

The `make test` inside both runs `test_runs_from_project_venv`, which proves that pytest and
the exporter it starts come from that .venv and not from another install on PATH.

Both need the network to Debian's and PyPI's repositories. Downloads are kept between runs
under ~/.cache/llm-usage-exporter-tests (or $LLM_TEST_CACHE).
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from helpers import Server, exporter_command, free_port

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# A stock Debian 12 with its python3 and make, and no python3-venv.
ROOTFS_INCLUDE = "python3,make,ca-certificates"
# The inner `make test` runs only this; it is skipped everywhere else.
PROBE = "tests/test_stock_debian.py::test_runs_from_project_venv"
# Variables that make a machine's network reachable (proxies, a TLS-inspecting CA): a user of
# this machine has them too. Files they name are copied into the chroot.
NETWORK_VARS = ("PIP_CERT", "PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
                "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
INSTALL_TIMEOUT = 1200.0

pytestmark = [pytest.mark.stock_debian, pytest.mark.slow]


# --- the probe the inner `make test` runs ----------------------------------------------------

@pytest.mark.skipif("LLM_TEST_EXPECT_VENV" not in os.environ,
                    reason="run by the stock-Debian tests inside their copy of the repository")
def test_runs_from_project_venv(tmp_path: Path) -> None:
    venv = Path(os.environ["LLM_TEST_EXPECT_VENV"])
    assert Path(sys.prefix) == venv and sys.prefix != sys.base_prefix, (sys.prefix, sys.base_prefix)
    import exporter
    assert Path(exporter.__file__).resolve().is_relative_to(venv.parent.resolve())
    # Nothing on PATH provides the exporter: the tests start the one beside their interpreter.
    assert shutil.which("llm-usage-exporter") is None
    assert Path(exporter_command()[0]).parent == venv / "bin"
    with Server(tmp_path, tmp_path / "usage.db") as srv:
        assert srv.client.get("/healthz").text == "ok\n"


# --- shared -----------------------------------------------------------------------------------

def cache_dir() -> Path:
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = Path(os.environ.get("LLM_TEST_CACHE") or xdg / "llm-usage-exporter-tests")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def cache_lock() -> Iterator[Path]:
    """The download cache, held by one stock-Debian test at a time (apt locks its archives)."""
    cache = cache_dir()
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield cache


def copy_repo(dest: Path) -> Path:
    """The repository's files as a clone has them (tracked and new, not ignored ones)."""
    ls = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        cwd=REPO, capture_output=True)
    if ls.returncode != 0:
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "*.db*", "*.egg-info", "results"))
        return dest
    for name in filter(None, ls.stdout.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = INSTALL_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`make run` exited with {proc.returncode} before answering {url}:\n{log.read_text()}")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                assert r.text == "ok\n"
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f}s:\n{log.read_text()}")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Ends `make run` and everything it started (they share its process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # a straggler of the group
    except ProcessLookupError:
        pass


def group_commands(pgid: int) -> list[list[str]]:
    """The command lines of the processes in one process group (read from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getpgid(int(d.name)) != pgid:
                continue
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        out.append([a.decode(errors="replace") for a in argv if a])
    return out


# --- on this machine, with its own python3 ------------------------------------------------

def system_env(**extra: str) -> dict[str, str]:
    """This environment less anything that points at another Python or at a developer's setup."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON", "VENV", "PYTEST_ARGS",
            "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("PYENV", "LLM_EXPORTER_", "LLM_TEST_"))}
    env["PATH"] = SYSTEM_PATH
    env.update(extra)
    return env


def externally_managed(python: str) -> bool:
    code = ("import os, sysconfig; "
            "print(os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() == "True"


def test_make_run_and_make_test_with_the_system_python(tmp_path: Path) -> None:
    if shutil.which("make", path=SYSTEM_PATH) is None:
        pytest.skip(f"no make in {SYSTEM_PATH}")
    python3 = shutil.which("python3", path=SYSTEM_PATH)
    if python3 is None:
        pytest.skip(f"no python3 in {SYSTEM_PATH}")
    if not externally_managed(python3):
        pytest.skip(f"{python3} is not externally managed (PEP 668), so it proves nothing here")
    has_venv = subprocess.run([python3, "-c", "import ensurepip, venv"], capture_output=True).returncode == 0
    if not has_venv and os.geteuid() != 0:
        pytest.skip(f"{python3} lacks python3-venv and installing it needs root (the chroot test covers it)")

    src = copy_repo(tmp_path / "src")
    venv = src / ".venv"
    try:
        check_on_this_machine(python3, src, venv, tmp_path)
    finally:
        shutil.rmtree(venv, ignore_errors=True)   # 160 MB; the logs stay


def check_on_this_machine(python3: str, src: Path, venv: Path, tmp_path: Path) -> None:
    port = free_port()
    env = system_env(LLM_EXPORTER_PORT=str(port), LLM_EXPORTER_DB=str(tmp_path / "demo.db"))
    url = f"http://127.0.0.1:{port}/healthz"

    # `make run` from nothing: makes .venv with the system python3, installs, serves the demo.
    log1 = tmp_path / "run1.log"
    with open(log1, "wb") as out:
        proc = subprocess.Popen(["make", "run"], cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_healthy(proc, url, log1)
            served = [c for c in group_commands(proc.pid) if "serve" in c]
        finally:
            stop_group(proc)
    text = log1.read_text()
    assert f"venv: making .venv with {os.path.realpath(python3)}" in text, text
    assert "venv: installing llm-usage-exporter into .venv" in text, text
    assert f"home = {Path(python3).parent}" in (venv / "pyvenv.cfg").read_text()
    assert served and all(Path(c[0]).parent == venv / "bin" for c in served), served

    # A second `make run` reuses .venv: no venv, no pip.
    stamp = (venv / ".installed").stat().st_mtime_ns
    log2 = tmp_path / "run2.log"
    with open(log2, "wb") as out:
        proc = subprocess.Popen(["make", "run"], cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_healthy(proc, url, log2)
        finally:
            stop_group(proc)
    assert "venv:" not in log2.read_text(), log2.read_text()
    assert (venv / ".installed").stat().st_mtime_ns == stamp

    # `make test` adds the test extras to the same .venv and runs pytest from it.
    r = subprocess.run(["make", "test", f"PYTEST_ARGS={PROBE}"], cwd=src,
                       env=system_env(LLM_TEST_EXPECT_VENV=str(venv)), capture_output=True, text=True,
                       timeout=INSTALL_TIMEOUT)
    output = r.stdout + r.stderr
    assert r.returncode == 0, output
    assert "venv: installing llm-usage-exporter with [test] into .venv" in output, output
    assert f".venv/bin/python -m pytest -q {PROBE}" in output, output
    assert "1 passed" in output, output


# --- in a Debian 12 made from nothing ------------------------------------------------------------

class Chroot:
    """A debootstrapped Debian, entered through `unshare` (own mount and PID namespaces, so its
    mounts and processes end with it) and `chroot`, with a clean environment."""

    def __init__(self, root: Path, cache: Path) -> None:
        self.root = root
        self.cache = cache

    def build(self) -> None:
        """Unpacks the cached root file system, made by debootstrap when absent or a month old."""
        tarball = self.cache / f"{DEBIAN_SUITE}-minbase-{ROOTFS_INCLUDE.replace(',', '-')}.tar"
        if not tarball.exists() or time.time() - tarball.stat().st_mtime > 30 * 86400:
            fresh = self.cache / f"rootfs-{os.getpid()}"
            subprocess.run(["rm", "-rf", "--one-file-system", str(fresh)], check=True)
            debs = self.cache / "debootstrap"
            debs.mkdir(exist_ok=True)
            r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={ROOTFS_INCLUDE}",
                                f"--cache-dir={debs}", DEBIAN_SUITE, str(fresh), DEBIAN_MIRROR],
                               capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            subprocess.run(["tar", "-C", str(fresh), "-cf", f"{tarball}.part", "."], check=True)
            os.replace(f"{tarball}.part", tarball)
            subprocess.run(["rm", "-rf", "--one-file-system", str(fresh)], check=True)
        self.root.mkdir(parents=True)
        subprocess.run(["tar", "-C", str(self.root), "-xf", str(tarball)], check=True)
        # A throwaway system: dpkg need not sync every file (as in Debian's container images).
        (self.root / "etc/dpkg/dpkg.cfg.d/unsafe-io").write_text("force-unsafe-io\n")
        # No service starts inside (as in a container); the tests start their own.
        rc = self.root / "usr/sbin/policy-rc.d"
        rc.write_text("#!/bin/sh\nexit 101\n")
        rc.chmod(0o755)
        for d in ("root/.cache/pip", "var/cache/apt/archives"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for name in NETWORK_VARS:
            value = os.environ.get(name, "")
            if value.startswith("/") and Path(value).is_file():
                (self.root / value.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(value, self.root / value.lstrip("/"))

    def command(self, script: str, **env: str) -> list[str]:
        base = {"HOME": "/root", "PATH": SYSTEM_PATH, "LANG": "C.UTF-8",
                **{k: os.environ[k] for k in NETWORK_VARS if k in os.environ}, **env}
        pip_cache, apt_cache = self.cache / "pip", self.cache / "apt-archives"
        pip_cache.mkdir(exist_ok=True)
        apt_cache.mkdir(exist_ok=True)
        root = shlex.quote(str(self.root))
        inner = " && ".join([
            f"mount --rbind /dev {root}/dev",
            f"mount --bind {shlex.quote(str(pip_cache))} {root}/root/.cache/pip",
            f"mount --bind {shlex.quote(str(apt_cache))} {root}/var/cache/apt/archives",
            f"exec chroot {root} /usr/bin/env -i " + " ".join(shlex.quote(f"{k}={v}") for k, v in base.items())
            + " /bin/sh -c " + shlex.quote(script),
        ])
        return ["unshare", "--mount", "--pid", "--fork", "--kill-child", f"--mount-proc={self.root}/proc",
                "--", "/bin/sh", "-c", inner]

    def run(self, script: str, timeout: float = INSTALL_TIMEOUT, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(script, **env), capture_output=True, text=True, timeout=timeout)

    def remove(self) -> None:
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], check=False)


def test_make_run_and_make_test_on_a_debootstrapped_debian(tmp_path: Path, cache_lock: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: it debootstraps a Debian 12 and chroots into it")
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":" + SYSTEM_PATH) is None:
            pytest.skip(f"{tool} not installed (scripts/install-test-deps.sh installs debootstrap)")

    box = Chroot(tmp_path / "debian", cache_lock)
    try:
        box.build()
        app = "/root/llm-usage-exporter"
        copy_repo(box.root / app.lstrip("/"))

        # Its python3 is externally managed and cannot make a venv yet.
        r = box.run("python3 -c 'import ensurepip' ; echo rc=$?; "
                    "test -f /usr/lib/python3*/EXTERNALLY-MANAGED && echo managed", timeout=60)
        assert "rc=1" in r.stdout and "managed" in r.stdout, r.stdout + r.stderr

        port = free_port()
        url = f"http://127.0.0.1:{port}/healthz"
        log = tmp_path / "chroot-run.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(box.command(f"cd {app} && make run", LLM_EXPORTER_PORT=str(port),
                                                LLM_EXPORTER_DB="/tmp/demo.db"),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_healthy(proc, url, log)
                served = [c for c in group_commands(proc.pid) if "serve" in c]
            finally:
                stop_group(proc)
        text = log.read_text()
        assert "venv: installing Debian packages: python3.11-venv" in text, text
        assert "venv: making .venv with /usr/bin/python3.11" in text, text
        assert served and all(c[0].startswith(f"{app}/.venv/bin/") for c in served), served

        r = box.run(f"cd {app} && make test PYTEST_ARGS={PROBE}", LLM_TEST_EXPECT_VENV=f"{app}/.venv")
        output = r.stdout + r.stderr
        assert r.returncode == 0, output[-6000:]
        assert f".venv/bin/python -m pytest -q {PROBE}" in output, output[-6000:]
        assert "1 passed" in output, output[-6000:]
    finally:
        box.remove()
