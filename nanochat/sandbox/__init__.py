"""Running model-written Python: bubblewrap + seccomp (bwrap), a cgroup per run (cgroups), the tool itself (execution)."""
