"""A pids + memory cgroup per sandbox run, on cgroup v2 or v1, wherever this user may create one, with a quota of one
CPU where the cpu controller is there too.

Candidates, most respectful of the host's own limits first: a child of this process's own cgroup (a delegated
subtree on v2, e.g. a systemd user service or `systemd-run --user -p Delegate=yes`), then a child of the hierarchy's
root (root only). On v2 the parent must have `pids` and `memory` in its subtree_control; we enable them when we may,
which the kernel refuses (EBUSY) for a non-root cgroup that holds processes, such as the server's own. When no
candidate works, `probe()` says why and the sandbox falls back to rlimits.
"""

import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

CGROUP_FS = Path("/sys/fs/cgroup")
SLACK_BYTES = 64 << 20  # bwrap, the interpreter and its page tables, on top of the program's own limit
CPU_PERIOD_US = 100_000  # quota = period: one CPU per run, so busy runs cannot take all of the host's cores


def _own_paths() -> dict[str, str]:
    """{controller or "" for v2: path of this process's cgroup}, from /proc/self/cgroup."""
    paths = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
    except (OSError, ValueError):
        pass
    return paths


def _mounts() -> dict[str, Path]:
    """{"v2": mount point} and {controller: mount point} for v1 hierarchies, from /proc/self/mounts."""
    found = {}
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            _, point, fstype, options = line.split()[:4]
            if fstype == "cgroup2" and "v2" not in found:
                found["v2"] = Path(point)
            elif fstype == "cgroup":
                for c in ("pids", "memory", "cpu"):
                    if c in options.split(","):
                        found.setdefault(c, Path(point))
    except (OSError, ValueError):
        pass
    return found


@dataclass
class Cgroup:
    """One run's cgroup(s): a single v2 group, or a pids, a memory and (where mounted) a cpu group on v1."""
    version: int
    dirs: list[Path]
    cpu_quota: bool = False

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def oom_killed(self) -> bool:
        for d in self.dirs:
            try:
                if self.version == 2:
                    events = dict(line.split() for line in (d / "memory.events").read_text().splitlines())
                    if int(events.get("oom_kill", 0)) > 0 or int(events.get("oom", 0)) > 0:
                        return True
                elif (d / "memory.oom_control").exists():  # v1: failcnt also counts limits hit and reclaimed
                    control = dict(line.split() for line in (d / "memory.oom_control").read_text().splitlines())
                    if int(control.get("oom_kill", 0)) > 0:
                        return True
            except (OSError, ValueError):
                pass
        return False

    def destroy(self) -> None:
        """Kill whatever is left inside (a detached child, say) and remove the group(s)."""
        for d in self.dirs:
            if (d / "cgroup.kill").exists():
                try:
                    (d / "cgroup.kill").write_text("1")
                except OSError:
                    pass
            for _ in range(100):
                try:
                    pids = (d / "cgroup.procs").read_text().split()
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, PermissionError, ValueError):
                        pass
                time.sleep(0.01)
            for _ in range(100):  # rmdir fails while the kernel is still tearing the last task down
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _try_v2(parent: Path, memory_bytes: int, max_processes: int) -> Cgroup:
    enabled = (parent / "cgroup.subtree_control").read_text().split()
    missing = [c for c in ("pids", "memory") if c not in enabled]
    if missing:
        (parent / "cgroup.subtree_control").write_text(" ".join("+" + c for c in missing))
    if "cpu" not in enabled and "cpu" in (parent / "cgroup.controllers").read_text().split():
        try:
            (parent / "cgroup.subtree_control").write_text("+cpu")
        except OSError:  # optional: the run goes without a CPU quota, and the start line says so
            pass
    group = parent / f"nanochat-sandbox-{uuid.uuid4().hex[:12]}"
    group.mkdir()
    try:
        (group / "pids.max").write_text(str(max_processes))
        (group / "memory.max").write_text(str(memory_bytes))
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
    except OSError:
        group.rmdir()
        raise
    made = Cgroup(2, [group])
    made.cpu_quota = _write_all({group / "cpu.max": f"{CPU_PERIOD_US} {CPU_PERIOD_US}"})
    return made


def _try_v1(parents: dict[str, Path], memory_bytes: int, max_processes: int) -> Cgroup:
    name = f"nanochat-sandbox-{uuid.uuid4().hex[:12]}"
    made = Cgroup(1, [])
    try:
        pids = parents["pids"] / name
        pids.mkdir()
        made.dirs.append(pids)
        (pids / "pids.max").write_text(str(max_processes))
        mem = parents["memory"] / name
        mem.mkdir()
        made.dirs.append(mem)
        (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
        if (mem / "memory.memsw.limit_in_bytes").exists():  # no escaping the limit into swap
            (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
    except OSError:
        made.destroy()
        raise
    if "cpu" in parents:
        try:
            (parents["cpu"] / name).mkdir()
            made.dirs.append(parents["cpu"] / name)
        except OSError:
            return made
        made.cpu_quota = _write_all({parents["cpu"] / name / "cpu.cfs_period_us": str(CPU_PERIOD_US),
                                     parents["cpu"] / name / "cpu.cfs_quota_us": str(CPU_PERIOD_US)})
    return made


def _write_all(values: dict[Path, str]) -> bool:
    try:
        for path, value in values.items():
            path.write_text(value)
        return True
    except OSError:
        return False


def _where(group: Cgroup, parent: Path) -> str:
    cpu = "a quota of 1 CPU" if group.cpu_quota else "no CPU quota: the cpu controller is not available here"
    return f"cgroup v{group.version} under {parent}, {cpu}"


def create(memory_bytes: int, max_processes: int) -> tuple[Cgroup | None, str]:
    """A fresh cgroup limited to `memory_bytes` (+ slack) and `max_processes` (+ bwrap's own), or None and why."""
    memory_bytes, max_processes = memory_bytes + SLACK_BYTES, max_processes + 4
    own, mounts, errors = _own_paths(), _mounts(), []
    if "v2" in mounts and "" in own:
        root = mounts["v2"]
        available = (root / "cgroup.controllers").read_text().split() if (root / "cgroup.controllers").exists() else []
        if {"pids", "memory"} <= set(available):
            for parent in dict.fromkeys([root / own[""].lstrip("/"), root]):
                try:
                    group = _try_v2(parent, memory_bytes, max_processes)
                    return group, _where(group, parent)
                except OSError as e:
                    errors.append(f"v2 {parent}: {e.strerror or e}")
    if "pids" in mounts and "memory" in mounts:
        for use_own in (True, False):
            parents = {c: mounts[c] / (own.get(c, "/").lstrip("/") if use_own else "")
                       for c in ("pids", "memory", "cpu") if c in mounts}
            try:
                group = _try_v1(parents, memory_bytes, max_processes)
                return group, _where(group, parents["memory"])
            except OSError as e:
                errors.append(f"v1 {parents['memory']}: {e.strerror or e}")
    if not errors:
        errors.append("no cgroup hierarchy with the pids and memory controllers is mounted")
    return None, "; ".join(dict.fromkeys(errors))


def probe() -> tuple[bool, str]:
    """(whether runs get a cgroup here, where or why not): creates and removes one."""
    group, where = create(16 << 20, 4)
    if group is None:
        return False, where
    group.destroy()
    return True, where
