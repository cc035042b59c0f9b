"""The sandbox is a security boundary: each attack is contained and the host is unaffected afterwards."""

import os
import socket
import threading
import time

import psutil
import pytest

from nanochat.execution import execute_code, isolation_layers


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(autouse=True)
def host_is_unaffected():
    before = children()
    yield
    deadline = time.time() + 10
    while children() - before and time.time() < deadline:
        time.sleep(0.1)
    assert not children() - before, "sandbox processes outlived the call"


def test_normal_code_runs_and_prints():
    result = execute_code("import math\nprint(math.factorial(6), 'ünïcode ✓')")
    assert result.success and result.stdout == "720 ünïcode ✓\n" and result.error is None


def test_exceptions_and_syntax_errors_are_reported():
    result = execute_code("raise ValueError('boom')")
    assert not result.success and "ValueError: boom" in result.error
    result = execute_code("def broken(:")
    assert not result.success and "SyntaxError" in result.stderr


def test_infinite_loop_times_out():
    t0 = time.time()
    result = execute_code("while True:\n    pass", timeout=1.0)
    assert result.timeout and not result.success and time.time() - t0 < 10


def test_fork_bomb_is_contained():
    t0 = time.time()
    result = execute_code("import os\nwhile True:\n    os.fork()", timeout=2.0)
    assert not result.success and time.time() - t0 < 15
    result = execute_code("import _posixsubprocess, os\nwhile True:\n    os.fork()", timeout=2.0)
    assert not result.success


def test_memory_bomb_hits_the_limit():
    result = execute_code("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))", memory_limit_mb=128, timeout=10)
    assert result.memory_exceeded and not result.success


def test_huge_output_is_truncated():
    result = execute_code("while True:\n    print('x' * 10000)", timeout=1.0, max_output_bytes=5000)
    assert len(result.stdout) < 6000 and "[output truncated]" in result.stdout


def test_files_outside_the_sandbox_cannot_be_written_or_deleted(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    os.chmod(tmp_path, 0o777)
    for code in (f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
                 f"import os\nos.remove({str(sentinel)!r})",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 "open('/etc/passwd', 'a').write('hacker::0:0::/:/bin/sh')"):
        result = execute_code(code)
        assert not result.success, code
    assert sentinel.read_text() == "keep me" and not (tmp_path / "new.txt").exists()
    assert "hacker" not in open("/etc/passwd").read()


def test_the_working_directory_is_private_and_writable():
    result = execute_code("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())")
    assert result.success and result.stdout.strip() == "ok"


def test_secrets_in_the_environment_and_home_are_not_visible(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    home_secret = os.path.expanduser("~/.nanochat-test-secret")
    with open(home_secret, "w") as f:
        f.write("hunter3")
    try:
        result = execute_code("import os\nprint(dict(os.environ))\n"
                              f"print(open({home_secret!r}).read())")
        assert "hunter2" not in result.stdout and "hunter3" not in result.stdout
        assert not result.success
    finally:
        os.remove(home_secret)


def test_network_connections_fail():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True).start()
    for code in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}))",
                 f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
                 "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)"):
        assert not execute_code(code, timeout=5).success, code
    time.sleep(0.5)
    assert accepted in ([], [None])
    server.close()


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


def test_spawning_a_shell_is_contained(tmp_path):
    target = tmp_path / "from-shell"
    os.chmod(tmp_path, 0o777)
    for code in (f"import os\nos.system('touch {target}')",
                 f"import subprocess\nsubprocess.run(['sh', '-c', 'touch {target}'])",
                 f"import pty\npty.spawn(['sh', '-c', 'touch {target}'])"):
        execute_code(code, timeout=3)
    assert not target.exists()


def test_kernel_isolation_layers_are_active_in_ci():
    if os.environ.get("CI") and os.geteuid() == 0:
        assert "network namespace" in isolation_layers() and "pids + memory cgroup" in isolation_layers()
    assert isinstance(isolation_layers(), list)
