"""Device choice: a CUDA request without a usable GPU stops with one line naming the driver and torch's CUDA."""

import os
import subprocess
import sys

import pytest
import torch

from nanochat import common
from nanochat.common import UserError, compute_init

NO_GPU = not torch.cuda.is_available()


@pytest.mark.skipif(not NO_GPU, reason="this machine has a usable CUDA GPU")
@pytest.mark.parametrize("stage", [["scripts.base_train", "--depth=2"], ["scripts.chat_web"]])
def test_a_cuda_request_on_a_machine_without_a_usable_gpu_stops_with_one_line(base_dir, stage):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    proc = subprocess.run([sys.executable, "-m", *stage, "--device-type=cuda", "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--device-type=cuda but no usable CUDA GPU" in proc.stderr
    assert torch.__version__ in proc.stderr and "NVIDIA driver" in proc.stderr
    assert "not training" not in proc.stdout  # stopped before anything ran on the CPU


def test_a_driver_too_old_for_torch_is_named_with_both_versions(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(common, "nvidia_driver_version", lambda: "470.57.02")
    with pytest.raises(UserError) as error:
        compute_init("cuda")
    message = str(error.value)
    assert "\n" not in message
    assert "NVIDIA driver 470.57.02" in message and "CUDA 12.8" in message and "update the driver" in message


def test_autodetection_falling_back_to_the_cpu_beside_a_driver_says_so(monkeypatch, capsys):
    monkeypatch.delenv("NANOCHAT_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(common, "nvidia_driver_version", lambda: "470.57.02")
    assert compute_init().device_type == "cpu"
    lines = capsys.readouterr().out.splitlines()
    assert any("running on the CPU although an NVIDIA driver is installed" in line and "470.57.02" in line
               for line in lines)


def test_the_driver_version_is_read_from_the_kernel_modules_version_file(monkeypatch, tmp_path):
    real_read_text = common.Path.read_text
    lines = {"NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023": "535.104.05",
             "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build": "570.86.15"}
    for line, version in lines.items():
        monkeypatch.setattr(common.Path, "read_text", lambda self, *a, **k: line + "\nGCC version: gcc 12\n"
                            if str(self) == "/proc/driver/nvidia/version" else real_read_text(self, *a, **k))
        assert common.nvidia_driver_version() == version
