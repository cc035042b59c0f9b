"""The sandbox's adversarial set, run in whatever setup this process is in (its user, its PATH, this machine).

    python tests/sandbox_attacks.py      # last line: {"banner": ..., "outcomes": {attack: outcome}}

Each attack runs hostile code through `execute_code` and then checks the host for the harm it tried to do. The
outcome is "contained" (the code ran and the harm did not happen), "refused" (the tool is off here), or
"ESCAPED: <evidence>". tests/test_execution.py runs this file as root, as nobody (setpriv) and with an empty PATH.
It imports only nanochat's sandbox modules, so a copy runs under any Python 3.10+. Every attack aims only at files
and processes it made itself, so that running it where the sandbox fails (or with the tool forced on without one)
harms nothing else.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from nanochat.sandbox.execution import REFUSED_PREFIX, execute_code, python_tool_banner

ATTACKS = {}
LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def attack(fn):
    ATTACKS[fn.__name__] = fn
    return fn


class Refused(Exception):
    pass


def run(code: str, **kwargs):
    result = execute_code(code, **kwargs)
    if result.error and result.error.startswith(REFUSED_PREFIX):
        raise Refused
    return result


def world_writable_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="nanochat-attack-"))
    d.chmod(0o777)
    return d


@attack
def write_and_delete_host_files():
    d = world_writable_dir()
    sentinel = d / "sentinel"
    sentinel.write_text("keep me")
    sentinel.chmod(0o666)
    run(f"import os, shutil\nopen({str(d / 'new')!r}, 'w').write('x')\nos.remove({str(sentinel)!r})\n"
        f"shutil.rmtree({str(d)!r})")
    if (d / "new").exists() or not sentinel.exists() or sentinel.read_text() != "keep me":
        return "a host file was written or deleted"


@attack
def remount_read_write():
    """The issue's attack: remount / (and /usr, a host bind) read-write, then write through it."""
    marker = f"/usr/nanochat-escape-{uuid.uuid4().hex[:8]}"
    r = run(LIBC + "MS_REMOUNT, MS_BIND = 32, 4096\n"
            "for target in (b'/', b'/usr'):\n"
            "    print('mount', libc.mount(None, target, None, MS_REMOUNT | MS_BIND, None))\n"
            f"open({marker!r}, 'w').write('x')")
    if os.path.exists(marker) or "mount 0" in r.stdout:
        return "remount succeeded: " + r.stdout.strip()


@attack
def unmount_the_read_only_binds():
    r = run(LIBC + "for target in (b'/usr', b'/tmp', b'/'):\n    print('umount', libc.umount2(target, 2))")
    if "umount 0" in r.stdout:
        return r.stdout.strip()


@attack
def new_user_namespace_then_remount():
    """unshare(CLONE_NEWUSER | CLONE_NEWNS) would make the code root of its own namespace, with mount rights."""
    r = run(LIBC + "print('unshare', libc.unshare(0x10000000 | 0x20000))\n"
            "print('mount', libc.mount(None, b'/', None, 32 | 4096, None))")
    if "unshare 0" in r.stdout or "mount 0" in r.stdout:
        return r.stdout.strip()


@attack
def connect_to_host_unix_sockets():
    d = world_writable_dir()
    path = str(d / "host.sock")
    abstract = f"\0nanochat-attack-{uuid.uuid4().hex[:8]}"
    listeners = []
    for address in (path, abstract):
        s = socket.socket(socket.AF_UNIX)
        s.bind(address)
        s.listen()
        s.setblocking(False)
        listeners.append(s)
    os.chmod(path, 0o777)
    run("import _socket\n"
        f"for address in ({path!r}, {abstract!r}):\n"
        "    try:\n        s = _socket.socket(_socket.AF_UNIX)\n        s.connect(address)\n        print('connected')\n"
        "    except OSError as e:\n        print(e)")
    time.sleep(0.2)
    accepted = 0
    for s in listeners:
        try:
            s.accept()
            accepted += 1
        except BlockingIOError:
            pass
        s.close()
    if accepted:
        return f"{accepted} host Unix socket(s) accepted a connection"


@attack
def connect_to_host_tcp():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    run(f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))")
    time.sleep(0.2)
    try:
        server.accept()
        return "the host's loopback listener accepted a connection"
    except BlockingIOError:
        pass
    finally:
        server.close()


@attack
def spawn_a_shell():
    target = world_writable_dir() / "from-shell"
    run(f"import posix\nposix.system('touch {target}')\n"
        f"if posix.fork() == 0:\n    posix.execv('/bin/sh', ['sh', '-c', 'touch {target}'])\nposix.wait()")
    if target.exists():
        return "a shell wrote to the host"


@attack
def read_host_secrets():
    secret = f"hunter-{uuid.uuid4().hex[:8]}"
    os.environ["NANOCHAT_ATTACK_SECRET"] = secret  # this process's environment: the server's, in real use
    d = Path(tempfile.mkdtemp(prefix="nanochat-attack-"))
    d.chmod(0o755)
    (d / "secret").write_text(secret)
    (d / "secret").chmod(0o644)
    try:
        r = run("import os\nprint(dict(os.environ))\n"
                f"for path in [{str(d / 'secret')!r}, '/proc/self/environ', '/proc/1/environ', "
                f"'/proc/{os.getpid()}/environ', '/proc/{os.getppid()}/environ']:\n"
                "    try:\n        print(open(path, 'rb').read())\n    except OSError as e:\n        print(e)")
    finally:
        del os.environ["NANOCHAT_ATTACK_SECRET"]
    if secret in r.stdout:
        return "a secret was read"


@attack
def kill_host_processes():
    sleeper = subprocess.Popen(["sleep", "60"] if os.environ.get("PATH") else ["/bin/sleep", "60"])
    try:
        run(f"import posix, ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.ptrace(16, {sleeper.pid}, 0, 0))\n"
            f"try:\n    posix.kill({sleeper.pid}, 9)\nexcept OSError as e:\n    print(e)")
        time.sleep(0.2)
        if sleeper.poll() is not None:
            return "a host process was killed"
    finally:
        sleeper.kill()
        sleeper.wait()


ESCAPEE = "nc-escapee"


@attack
def detached_child_outlives_the_call():
    run(LIBC + "import posix, time\n"
        "if posix.fork() == 0:\n    posix.setsid()\n    if posix.fork() == 0:\n"
        f"        libc.prctl(15, {ESCAPEE.encode()!r}, 0, 0, 0)\n        time.sleep(30)\n    posix._exit(0)\n"
        "time.sleep(0.3)\nprint('parent done')", timeout=3.0)
    deadline = time.time() + 2
    while time.time() < deadline:
        left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _comm(p) == ESCAPEE]
        if not left:
            return None
        time.sleep(0.1)
    for p in left:
        try:
            os.kill(int(p.name), signal.SIGKILL)
        except OSError:
            pass
    return f"{len(left)} detached process(es) still running after the call"


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return ""


@attack
def fork_bomb():
    t0 = time.time()
    run("import posix\nwhile True:\n    posix.fork()", timeout=2.0)
    if time.time() - t0 > 20:
        return f"the call took {time.time() - t0:.0f} s"


@attack
def memory_bomb():
    r = run("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))", memory_limit_mb=128, timeout=10)
    if r.success or not (r.memory_exceeded or r.timeout):
        return f"not stopped: {r!r}"


@attack
def fill_the_working_directory():
    """Many files, each under RLIMIT_FSIZE, that together would pass the working directory's size."""
    r = run("n = 0\ntry:\n    for i in range(200):\n        open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n"
            "        n += 1\nexcept OSError as e:\n    print(e)\nprint('MB', n)", max_file_mb=4, work_mb=16)
    written = int(r.stdout.split("MB")[-1]) if "MB" in r.stdout else 0
    if written > 16:
        return f"wrote {written} MB into a 16 MB working directory"


@attack
def infinite_loop():
    t0 = time.time()
    r = run("while True:\n    pass", timeout=1.0)
    if not r.timeout or time.time() - t0 > 15:
        return f"not stopped in time: {r!r}"


def main(names: list[str]) -> None:
    outcomes = {}
    for name, fn in ATTACKS.items():
        if names and name not in names:
            continue
        try:
            evidence = fn()
            outcomes[name] = f"ESCAPED: {evidence}" if evidence else "contained"
        except Refused:
            outcomes[name] = "refused"
    print(json.dumps({"banner": python_tool_banner(), "uid": os.getuid(), "outcomes": outcomes}))


if __name__ == "__main__":
    main(sys.argv[1:])
