"""Run untrusted, model-written Python in a separate process that cannot hurt the host.

Threat model: the code is arbitrary and possibly hostile (loops, fork bombs, memory and disk bombs, file and network
access, reading secrets, escaping its namespaces, detached processes). Layers, strongest first:

Kernel-enforced, when `nanochat.sandbox.bwrap.detect()` finds them (Linux with bubblewrap and libseccomp, as root or with
unprivileged user namespaces): pid/network/ipc/uts/mount namespaces, a read-only view of only /usr and the Python
runtime, a size-limited tmpfs working directory, a seccomp filter, no capabilities, no_new_privs, a uid of each
run's own when started as root, else a user namespace of its own (see nanochat/sandbox/bwrap.py); and a pids +
memory cgroup per run wherever one may be created (nanochat/sandbox/cgroups.py).
Always: wall-clock timeout (the whole process tree is killed), RLIMIT_CPU, RLIMIT_AS (not on macOS, where it cannot
be set), RLIMIT_FSIZE, RLIMIT_NPROC, no core dumps, an empty environment, stdin closed, output captured
incrementally and truncated, Python-level guards on process spawning and sockets (best effort only).

Without the kernel layers the tool is OFF: `execute_code` refuses with a one-line reason unless the user opted in
with `--unsafe-python-tool` / NANOCHAT_UNSAFE_PYTHON_TOOL=1, and `python_tool_banner()` says which case holds.
"""

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from nanochat.sandbox import cgroups
from nanochat.sandbox.bwrap import detect, run_bwrap, run_uid

UNSAFE_ENV = "NANOCHAT_UNSAFE_PYTHON_TOOL"
REFUSED_PREFIX = "the python tool is off"
MAX_OPEN_FILES = 64  # per process: what a calculator needs, and a bound on what descriptors can pin (buffers, ptys)
# Join the run's cgroup(s), then exec the sandbox, so that every process it ever starts is accounted there.
JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done; shift; exec "$@"'


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
# What this machine offers, and whether the tool may run

@functools.cache
def _cgroup_probe() -> tuple[bool, str]:
    return cgroups.probe()


def isolation_layers() -> list[str]:
    """The kernel-enforced layers execute_code uses on this machine (empty when there are none)."""
    sandbox, _ = detect()
    if sandbox is None:
        return []
    ok, where = _cgroup_probe()
    cgroup = f"pids + memory cgroup per run ({where})" if ok else \
        (f"NO per-run memory bound: no cgroup ({where}); RLIMIT_AS caps each process, so a run may hold its limit "
         "once per process")
    return [*sandbox.layers(), cgroup]


def unsafe_allowed() -> bool:
    return os.environ.get(UNSAFE_ENV, "") == "1"


def refusal_reason() -> str | None:
    """Why `execute_code` would refuse to run code on this machine (no kernel sandbox, and running without one not
    allowed), or None when it would run it."""
    sandbox, why = detect()
    return None if sandbox is not None or unsafe_allowed() else why


def allow_unsafe_python_tool() -> None:
    """What --unsafe-python-tool does: run the tool even without the kernel layers (inherited by child processes)."""
    os.environ[UNSAFE_ENV] = "1"


def python_tool_banner() -> str:
    """The one line scripts print at start: the layers in force, or why the tool is off and how to turn it on."""
    sandbox, why = detect()
    if sandbox is not None:
        return "python tool sandbox: " + "; ".join(isolation_layers())
    if unsafe_allowed():
        return (f"python tool UNSAFE (--unsafe-python-tool / {UNSAFE_ENV}=1): no kernel sandbox ({why}); model-written "
                f"code runs as uid {os.getuid()} with rlimits and a timeout only")
    return (f"python tool OFF: no kernel sandbox ({why}); pass --unsafe-python-tool (or set {UNSAFE_ENV}=1) to run "
            "model-written code with rlimits only")


# ---------------------------------------------------------------------------------------------------------------------
# The child: this code runs inside the sandbox process before the untrusted program

_BOOTSTRAP = r'''
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
if cfg["uid"] is not None:  # root inside a privileged bwrap holding only CAP_SETUID/CAP_SETGID/CAP_SETPCAP
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):  # empty the bounding set: no execve can bring a capability back (PR_CAPBSET_DROP)
        if libc.prctl(24, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: past the kernel's last cap
            raise OSError(ctypes.get_errno(), f"dropping capability {cap} from the bounding set")
    os.setgroups([])
    os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
    os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # clears the effective and permitted capabilities
    header, caps = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    if libc.capset(header, caps) != 0:  # and the inheritable ones
        raise OSError(ctypes.get_errno(), "capset")
os.chdir(cfg["workdir"])
if cfg["limit_address_space"]:
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_processes"], cfg["max_processes"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["max_files"], cfg["max_files"]))  # bounds socket buffers and ptys
code = open(cfg["program"], encoding="utf-8").read()
def _blocked(*args, **kwargs):
    raise PermissionError("the sandbox does not allow this (no processes, no network)")
import socket, subprocess
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


def execute_code(code: str, timeout: float = 5.0, memory_limit_mb: int = 256, max_output_bytes: int = 65536,
                 max_processes: int = 16, max_file_mb: int = 16, work_mb: int | None = None) -> ExecutionResult:
    """Run `code` with Python in the sandbox; its stdout/stderr, and what stopped it, come back in the result.
    `work_mb` (default 2 × max_file_mb) is the size of the working directory, a tmpfs in the kernel sandbox."""
    sandbox, why = detect()
    if sandbox is None and not unsafe_allowed():
        error = f"{REFUSED_PREFIX}: no kernel sandbox ({why}); --unsafe-python-tool or {UNSAFE_ENV}=1 runs it anyway"
        return ExecutionResult(stdout="", stderr="", success=False, error=error)
    work_bytes = (work_mb if work_mb is not None else 2 * max_file_mb) << 20
    claim = contextlib.ExitStack()
    try:
        uid = claim.enter_context(run_uid()) if sandbox and sandbox.switch_uid else None  # as root, the run's own uid
    except RuntimeError as e:  # every uid taken, or no private folder for the locks
        return ExecutionResult(stdout="", stderr="", success=False, error=str(e))
    group, _ = cgroups.create((memory_limit_mb << 20) + work_bytes, max_processes)
    workdir = None if sandbox else tempfile.mkdtemp(prefix="nanochat-sandbox-")
    try:
        python = os.path.realpath(sys.executable)
        cfg = {"workdir": "/tmp" if sandbox else workdir, "program": "/program.py" if sandbox else "program.py",
               "memory_bytes": memory_limit_mb << 20, "limit_address_space": sys.platform != "darwin",
               "cpu_seconds": max(1, int(timeout) + 1), "file_bytes": max_file_mb << 20,
               "max_processes": max_processes, "max_files": MAX_OPEN_FILES, "uid": uid}
        args = ["-I", "-S", "-X", "utf8", "-c", _BOOTSTRAP, json.dumps(cfg)]
        prefix = ("/bin/sh", "-c", JOIN_CGROUPS, "sh", *group.procs_files, "--") if group else ()
        pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
                 "start_new_session": True}
        if sandbox:
            proc = run_bwrap(sandbox, python, args, code.encode("utf-8", errors="surrogateescape"), work_bytes,
                             prefix=prefix, **pipes)
        else:
            Path(workdir, "program.py").write_text(code, encoding="utf-8", errors="surrogateescape")
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
                   "PYTHONDONTWRITEBYTECODE": "1"}
            proc = subprocess.Popen([*prefix, python, *args], env=env, cwd=workdir, **pipes)
        out, err = _Capture(proc.stdout, max_output_bytes), _Capture(proc.stderr, max_output_bytes)
        out.start()
        err.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_tree(proc)  # also children left behind in the process group (outside the kernel sandbox)
        oom = group.oom_killed() if group else False
        if group:
            group.destroy()
            group = None
        out.join(timeout=5)
        err.join(timeout=5)
        stderr = err.text()
        code_rc = proc.returncode
        memory = (code_rc == 3 and "MemoryError" in stderr) or oom
        if timed_out:
            error = f"timed out after {timeout:g} s"
        elif memory:
            error = f"memory limit of {memory_limit_mb} MB exceeded"
        elif code_rc == 125 and prefix:
            error = "could not join the sandbox's cgroup"
        elif code_rc != 0:
            error = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {code_rc}"
        else:
            error = None
        return ExecutionResult(stdout=out.text(), stderr=stderr, success=code_rc == 0 and not timed_out and not memory,
                               timeout=timed_out, memory_exceeded=bool(memory), error=error)
    finally:
        if group:
            group.destroy()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        claim.close()  # after the kill: no process of this run is left to share the uid with the next one


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill the sandbox's process group (bwrap's --die-with-parent takes the whole pid namespace with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:  # the group is already empty
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
