"""The kernel-enforced part of the Python sandbox: bubblewrap's namespaces plus a libseccomp filter.

bubblewrap (`bwrap`, Debian/Ubuntu/Fedora package `bubblewrap`) builds the sandbox's world from nothing: new pid,
network, ipc and uts namespaces, and a mount namespace whose root is an empty tmpfs holding only read-only binds of
/usr and the Python installation plus a size-limited tmpfs /tmp (every bind is read-only recursively, submounts
included; no /home, /etc, /proc, /sys or /run at all; a /dev without ptys). It drops every capability and sets
no_new_privs, then loads our seccomp program just before it executes Python, so the untrusted code starts inside all
of it.

Who runs it: as root, bwrap runs privileged (no user namespace) keeping only CAP_SETUID/CAP_SETGID/CAP_SETPCAP, which
the bootstrap uses to empty the capability bounding set and become the run's own unprivileged uid (no capabilities
left) before the untrusted code runs; as another user, bwrap makes an unprivileged user namespace per run and disables
further ones. Either way RLIMIT_NPROC, which the kernel counts per uid (per user namespace), is each run's own:
concurrent runs cannot starve each other. Where neither works (no bwrap, Docker's default seccomp profile, user
namespaces disabled, macOS), `detect()` says why and the tool is off by default.
"""

import contextlib
import errno
import fcntl
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Refused with EPERM: changing mounts (old and new mount API), new namespaces, other processes' memory, kernel
# keyrings (shared per uid with the host), eBPF, io_uring (which can open sockets behind seccomp's back), modules,
# memfd_create (a memfd's pages count against no rlimit, so without a cgroup it would hold memory past the limit), and
# pidfd_getfd (in a user namespace the code shares its uid with bwrap's init, and could copy that process's fds).
DENIED_SYSCALLS = (
    "mount", "umount2", "pivot_root", "unshare", "setns", "ptrace", "bpf", "keyctl", "add_key", "request_key",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "chroot",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "perf_event_open", "userfaultfd",
    "process_vm_readv", "process_vm_writev", "name_to_handle_at", "open_by_handle_at", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "swapon", "swapoff", "reboot", "acct",
    "syslog", "socket", "memfd_create", "pidfd_getfd",
)
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x80)
ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# As root, each concurrent run gets a uid of its own from this range (owned by no user or file; a run's processes are
# all gone before its uid is handed out again), claimed with a lock file so that servers and ranks share the range.
RUN_UIDS = range(0x7E000000, 0x7E000000 + 256)
UID_LOCKS = "nanochat-sandbox-uids"


@functools.cache
def seccomp_program() -> bytes:
    """The BPF program bwrap installs: everything allowed except DENIED_SYSCALLS, socketpair of a family other than
    AF_UNIX, clone with a namespace flag, and clone3 (ENOSYS, whose flags seccomp cannot see: glibc then uses
    clone). Syscalls of another architecture (i386 via int 0x80) kill the process, libseccomp's default."""
    import pyseccomp as sc
    f = sc.SyscallFilter(sc.ALLOW)
    for name in DENIED_SYSCALLS:
        f.add_rule(sc.ERRNO(errno.EPERM), name)
    f.add_rule(sc.ERRNO(errno.EPERM), "socketpair", sc.Arg(0, sc.NE, socket.AF_UNIX))
    for flag in NAMESPACE_FLAGS:
        f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


@dataclass(frozen=True)
class Sandbox:
    bwrap: str
    version: str
    switch_uid: bool  # root: privileged bwrap, the bootstrap switches to the run's uid; else a user namespace

    def command(self, python: str, work_bytes: int, seccomp_fd: int, program_fd: int) -> list[str]:
        """bwrap's command line up to (not including) the Python arguments; the fds are inherited by bwrap."""
        cmd = [self.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
               "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        if self.switch_uid:
            cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
        else:
            cmd += ["--unshare-user", "--disable-userns"]
        cmd += ["--clearenv", "--setenv", "HOME", "/tmp", "--setenv", "PATH", "/usr/bin:/bin",
                "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONIOENCODING", "utf-8",
                "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--ro-bind", "/usr", "/usr"]
        for path in ROOT_LINKS:  # merged-/usr systems have symlinks here, older ones directories
            if os.path.islink(path):
                cmd += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                cmd += ["--ro-bind", path, path]
        cmd += ["--perms", "0755", "--dir", "/etc", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        for path in _python_dirs(python):
            parents = [p for p in _ancestors(path) if not os.path.islink(p)]
            for parent in parents:  # bwrap would copy the host's modes (/root is 0700), hiding Python
                cmd += ["--perms", "0755", "--dir", parent]
            cmd += ["--ro-bind", path, path]
        # an empty /dev/pts leaves /dev/ptmx dangling: the kernel's pty pool is shared by the whole host
        cmd += ["--dev", "/dev", "--tmpfs", "/dev/pts", "--remount-ro", "/dev/pts", "--remount-ro", "/dev",
                "--perms", "1777", "--size", str(work_bytes), "--tmpfs", "/tmp",
                "--perms", "0444", "--ro-bind-data", str(program_fd), "/program.py",
                "--remount-ro", "/", "--seccomp", str(seccomp_fd), "--chdir", "/tmp", "--"]
        return cmd

    def layers(self) -> list[str]:
        who = (f"each run as a uid of its own ({RUN_UIDS.start}+) with no capabilities and an empty bounding set"
               if self.switch_uid else
               f"runs as uid {os.getuid()} in a user namespace of its own with no capabilities, further user "
               "namespaces disabled")
        return [f"bubblewrap {self.version}: new pid, network, ipc and uts namespaces",
                "mount namespace: only /usr and the Python runtime, read-only (recursively); no /home, /etc, /proc, "
                "/sys or /run; no ptys; a size-limited tmpfs /tmp as the working directory",
                "seccomp: mount, umount2, pivot_root, unshare, setns, ptrace, pidfd_getfd, bpf, keyctl, io_uring, "
                "memfd_create, new namespaces and socket() refused (socketpair(AF_UNIX) allowed)",
                f"no_new_privs; {who}"]


def _ancestors(path: str) -> list[str]:
    """/a/b/c -> [/a, /a/b]"""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]


def _python_dirs(python: str) -> list[str]:
    """The Python installation's bin and lib folders to show read-only inside, unless /usr already holds them."""
    dirs = []
    for prefix in (os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(os.path.realpath(python)))):
        if prefix == "/usr" or prefix.startswith("/usr/"):
            continue
        if prefix == "/" or prefix in _home_dirs():
            raise ValueError(f"the Python runtime's prefix is {prefix}, {'the root' if prefix == '/' else 'a home'} "
                             "folder, whose bin/ and lib/ would be shown to the code: run nanochat with a Python "
                             "installed under a prefix of its own (a venv made from /usr/bin/python3, pyenv, uv)")
        for sub in ("bin", "lib", "lib64"):
            path = os.path.join(prefix, sub)
            if os.path.isdir(path) and not any(path == d or path.startswith(d + "/") for d in dirs):
                dirs.append(path)
    return sorted(set(dirs))


def _home_dirs() -> set[str]:
    """This user's $HOME and every account's home folder."""
    import pwd
    homes = {os.path.expanduser("~"), *(entry.pw_dir for entry in pwd.getpwall())}
    return {os.path.realpath(h) for h in homes if h}


def run_bwrap(sandbox: Sandbox, python: str, args: list[str], program: bytes, work_bytes: int,
              prefix: tuple[str, ...] = (), **popen) -> subprocess.Popen:
    """Start `prefix bwrap … python args` with `program` at /program.py inside (`prefix` joins a cgroup first)."""
    seccomp_r, seccomp_w = os.pipe()
    program_fd = os.memfd_create("program.py")
    try:
        os.write(seccomp_w, seccomp_program())
        os.close(seccomp_w)
        seccomp_w = -1
        view = memoryview(program)
        while view:
            view = view[os.write(program_fd, view):]
        os.lseek(program_fd, 0, os.SEEK_SET)
        command = [*sandbox.command(python, work_bytes, seccomp_r, program_fd), python, *args]
        return subprocess.Popen([*prefix, *command], pass_fds=(seccomp_r, program_fd), **popen)
    finally:
        for fd in (seccomp_r, seccomp_w, program_fd):
            if fd >= 0:
                os.close(fd)


@contextlib.contextmanager
def run_uid():
    """Claim a uid from RUN_UIDS no concurrent run holds (root only); it is free again when the block ends."""
    folder = _lock_folder()
    for uid in RUN_UIDS:
        fd = os.open(os.path.join(folder, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield uid
        finally:
            os.close(fd)  # releases the lock
        return
    raise RuntimeError(f"all {len(RUN_UIDS)} sandbox uids are in use by concurrent runs (locks in {folder})")


def _lock_folder() -> str:
    for parent in ("/run", tempfile.gettempdir()):
        folder = os.path.join(parent, UID_LOCKS)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError:
            continue
        st = os.lstat(folder)  # in a world-writable /tmp someone else may have made it first
        private = st.st_uid == os.geteuid() and not st.st_mode & 0o077
        if os.path.isdir(folder) and not os.path.islink(folder) and private:
            return folder
    raise RuntimeError(f"no private folder for the sandbox's uid locks: /run/{UID_LOCKS} and "
                       f"{tempfile.gettempdir()}/{UID_LOCKS} cannot be made or are not this user's with mode 0700")


@functools.cache
def detect() -> tuple[Sandbox | None, str]:
    """The sandbox this machine allows, or None and the reason (shown to the user)."""
    if sys.platform != "linux":
        return None, f"the kernel sandbox needs Linux (this is {sys.platform})"
    exe = shutil.which("bwrap")
    if exe is None:
        return None, "bubblewrap is not installed or not on PATH (apt-get install bubblewrap)"
    try:
        seccomp_program()
    except Exception as e:  # no pyseccomp, no libseccomp, or a syscall it does not know on this architecture
        return None, f"no seccomp filter: {e} (pip install pyseccomp; apt-get install libseccomp2)"
    try:
        _python_dirs(os.path.realpath(sys.executable))
    except ValueError as e:
        return None, str(e)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()[-1:] or ["?"]
    errors = []
    for drop in ([True, False] if os.geteuid() == 0 else [False]):
        sandbox = Sandbox(exe, version[0], drop)
        # as root, also whether the run uids exist here (a container's user namespace may map only 0-65535)
        probe = f"import os; os.setresuid(*[{RUN_UIDS[-1]}] * 3) if {drop} else None; print('ok')"
        try:
            proc = run_bwrap(sandbox, os.path.realpath(sys.executable), ["-I", "-S", "-c", probe], b"",
                             1 << 20, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            out, err = proc.communicate(timeout=20)
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(str(e))
            continue
        if proc.returncode == 0 and out.startswith(b"ok"):
            return sandbox, ""
        errors.append(err.decode(errors="replace").strip().splitlines()[-1:][0] if err.strip() else
                      f"bwrap exited with {proc.returncode}")
    return None, "bubblewrap cannot create the sandbox here: " + "; ".join(dict.fromkeys(errors))
