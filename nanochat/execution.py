"""Run untrusted, model-written Python in a separate process that cannot hurt the host.

Threat model: the code is arbitrary and possibly hostile (loops, fork bombs, memory bombs, file and network access,
reading secrets). Layers, strongest first; each is used when the machine allows it (`isolation_layers()` says which):

Kernel-enforced (Linux, `unshare` from util-linux, as root or with unprivileged user namespaces):
  - new PID namespace: the code sees no host process, and everything it starts dies with it;
  - new network namespace: no interface but a down loopback, so no connection can be made;
  - new mount namespace: `/` read-only, fresh tmpfs over /tmp, /var/tmp, /dev/shm, /sys and the home directories
    (the Python installation is bound back read-only), the working directory a size-limited tmpfs;
  - as root: a pids and memory cgroup per run (fork bombs and memory bombs are capped in the kernel), then the code
    runs as `nobody` with no capabilities (no raw devices, no root-owned files, RLIMIT_NPROC applies).
Always: wall-clock timeout (the whole process tree is killed), RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC,
no core dumps, an empty environment (HOME = the working directory), stdin closed, output captured incrementally and
truncated; in-process guards that remove process spawning and sockets from the `os`, `subprocess` and `socket`
modules (best effort: a determined program can get around Python-level guards, which is why the kernel layers exist).
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
NOBODY = 65534


@dataclass
class ExecutionResult:
    stdout: str
    stderr: str
    success: bool
    timeout: bool = False
    memory_exceeded: bool = False
    error: str | None = None

    def __repr__(self) -> str:
        flags = [name for name in ("success", "timeout", "memory_exceeded") if getattr(self, name)]
        return f"ExecutionResult({', '.join(flags) or 'failed'}, stdout={self.stdout[:80]!r}, error={self.error!r})"


# ---------------------------------------------------------------------------------------------------------------------
# What this machine offers

@functools.cache
def _unshare_prefix() -> tuple[str, ...] | None:
    """The `unshare` command line that works here (root, or an unprivileged user namespace), or None."""
    exe = shutil.which("unshare")
    if exe is None or sys.platform != "linux":
        return None
    base = (exe, "--fork", "--pid", "--net", "--mount", "--mount-proc", "--kill-child")
    candidates = [base] if os.geteuid() == 0 else []
    candidates.append(base + ("--user", "--map-root-user"))
    for prefix in candidates:
        try:
            ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return prefix
    return None


@functools.cache
def _cgroups_available() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        for controller in ("pids", "memory"):
            probe = CGROUP_ROOT / controller / f"nanochat-probe-{os.getpid()}"
            probe.mkdir()
            probe.rmdir()
        return True
    except OSError:
        return False


def isolation_layers() -> list[str]:
    """Which kernel-enforced layers execute_code uses on this machine."""
    layers = []
    prefix = _unshare_prefix()
    if prefix:
        layers += ["pid namespace", "network namespace", "mount namespace (read-only root, private tmp and home)"]
        if "--user" not in prefix:
            layers.append("privileges dropped to nobody")
    if prefix and "--user" not in prefix and _cgroups_available():
        layers.append("pids + memory cgroup")
    return layers


# ---------------------------------------------------------------------------------------------------------------------
# The child: this code runs inside the sandbox process before the untrusted program

_BOOTSTRAP = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
work = cfg["workdir"]
for procs in cfg["cgroups"]:
    with open(procs, "w") as f:
        f.write("0")
if cfg["namespaces"]:
    libc = ctypes.CDLL(None, use_errno=True)
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
    def mount(src, target, fstype, flags, data=None):
        enc = lambda s: s.encode() if s is not None else None
        if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {target}: {os.strerror(err)}")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", "/mnt", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m")  # staging for paths to keep visible
    keep = [p for p in cfg["keep"] if os.path.isdir(p)]
    staged = {}
    for i, path in enumerate(keep):
        stage = f"/mnt/keep{i}"
        os.mkdir(stage)
        mount(path, stage, None, MS_BIND | MS_REC)
        staged[path] = stage
    for hidden in cfg["hide"]:
        if os.path.isdir(hidden):
            size = "size=%dm" % cfg["work_mb"] if hidden == "/tmp" else "size=4m"
            mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, size + ",mode=755")
    for path, stage in staged.items():
        os.makedirs(path, exist_ok=True)
        mount(stage, path, None, MS_BIND | MS_REC)
        if path != work:
            mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    if cfg["drop_to_nobody"]:
        os.chown(work, cfg["nobody"], cfg["nobody"])
        os.setgroups([])
        os.setresgid(cfg["nobody"], cfg["nobody"], cfg["nobody"])
        os.setresuid(cfg["nobody"], cfg["nobody"], cfg["nobody"])
os.chdir(work)
mem = cfg["memory_bytes"]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_processes"], cfg["max_processes"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
code = open("program.py", encoding="utf-8").read()
def _blocked(*args, **kwargs):
    raise PermissionError("the sandbox does not allow this (no processes, no network)")
import socket, subprocess, shutil
for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execle",
             "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "posix_spawn",
             "posix_spawnp", "kill", "killpg", "setuid", "putenv", "chroot"):
    if hasattr(os, name):
        setattr(os, name, _blocked)
subprocess.Popen = _blocked
socket.socket = _blocked
socket.create_connection = _blocked
for name in list(sys.modules):
    if name.startswith("_posixsubprocess"):
        del sys.modules[name]
sys.modules["_posixsubprocess"] = None
sys.argv = ["program.py"]
try:
    exec(compile(code, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except MemoryError:
    sys.stderr.write("MemoryError\n")
    os._exit(3)
sys.stdout.flush()
'''


# ---------------------------------------------------------------------------------------------------------------------
# The parent

class _Capture(threading.Thread):
    """Drain a pipe, keeping at most `limit` bytes, so a flood of output cannot exhaust the parent's memory."""

    def __init__(self, pipe, limit: int):
        super().__init__(daemon=True)
        self.pipe, self.limit = pipe, limit
        self.data = bytearray()
        self.truncated = False

    def run(self) -> None:
        while chunk := self.pipe.read(65536):
            room = self.limit - len(self.data)
            if room > 0:
                self.data += chunk[:room]
            if len(chunk) > room:
                self.truncated = True
        self.pipe.close()

    def text(self) -> str:
        out = self.data.decode("utf-8", errors="replace")
        return out + "\n[output truncated]" if self.truncated else out


def _make_cgroups(memory_bytes: int, max_processes: int) -> list[Path]:
    name = f"nanochat-sandbox-{uuid.uuid4().hex[:12]}"
    pids = CGROUP_ROOT / "pids" / name
    mem = CGROUP_ROOT / "memory" / name
    pids.mkdir()
    (pids / "pids.max").write_text(str(max_processes))
    mem.mkdir()
    (mem / "memory.limit_in_bytes").write_text(str(memory_bytes + (64 << 20)))
    return [pids, mem]


def _remove_cgroups(groups: list[Path]) -> bool:
    """Kill whatever is left in the cgroups and remove them; True when the memory cgroup saw an OOM kill."""
    oom = False
    for group in groups:
        for _ in range(50):
            try:
                pids = (group / "cgroup.procs").read_text().split()
            except OSError:
                break
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            time.sleep(0.02)
        try:
            oom |= int((group / "memory.failcnt").read_text()) > 0 if (group / "memory.failcnt").exists() else False
        except (OSError, ValueError):
            pass
        try:
            group.rmdir()
        except OSError:
            pass
    return oom


def execute_code(code: str, timeout: float = 5.0, memory_limit_mb: int = 256, max_output_bytes: int = 65536,
                 max_processes: int = 16, max_file_mb: int = 16) -> ExecutionResult:
    """Run `code` with Python in the sandbox; its stdout/stderr, and what stopped it, come back in the result."""
    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    groups: list[Path] = []
    try:
        Path(workdir, "program.py").write_text(code, encoding="utf-8")
        prefix = _unshare_prefix()
        as_root = prefix is not None and "--user" not in prefix
        if as_root and _cgroups_available():
            groups = _make_cgroups(memory_limit_mb << 20, max_processes)
        home = os.path.expanduser("~")
        cfg = {
            "workdir": workdir, "memory_bytes": memory_limit_mb << 20, "cpu_seconds": max(1, int(timeout) + 1),
            "file_bytes": max_file_mb << 20, "max_processes": max_processes, "work_mb": max_file_mb * 2,
            "cgroups": [str(g / "cgroup.procs") for g in groups], "namespaces": prefix is not None,
            "keep": sorted({sys.base_prefix, sys.prefix, workdir}),
            "hide": sorted({"/tmp", "/var/tmp", "/dev/shm", "/sys", "/home", "/root", home} - {"/"}),
            "drop_to_nobody": as_root, "nobody": NOBODY,
        }
        command = [sys.executable, "-I", "-S", "-X", "utf8", "-c", _BOOTSTRAP, json.dumps(cfg)]
        if prefix:
            command = [*prefix, *command]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd=workdir, start_new_session=True)
        out, err = _Capture(proc.stdout, max_output_bytes), _Capture(proc.stderr, max_output_bytes)
        out.start()
        err.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(proc)
        out.join(timeout=5)
        err.join(timeout=5)
        oom = _remove_cgroups(groups) if groups else False
        groups = []
        stderr = err.text()
        code_rc = proc.returncode
        memory = (code_rc == 3 and "MemoryError" in stderr) or oom or (
            not timed_out and code_rc in (-signal.SIGKILL, 137) and "MemoryError" in stderr)
        if timed_out:
            error = f"timed out after {timeout:g} s"
        elif memory:
            error = f"memory limit of {memory_limit_mb} MB exceeded"
        elif code_rc != 0:
            error = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {code_rc}"
        else:
            error = None
        return ExecutionResult(stdout=out.text(), stderr=stderr, success=code_rc == 0 and not timed_out,
                               timeout=timed_out, memory_exceeded=bool(memory), error=error)
    finally:
        if groups:
            _remove_cgroups(groups)
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill the sandbox's process group (with --kill-child, the whole PID namespace goes with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
