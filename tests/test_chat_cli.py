"""chat_cli as a user runs it: one prompt, the interactive loop with clear/quit, and a clear error without a model."""

import os
import subprocess
import sys


def cli(base_dir, *args, stdin=None):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_single_prompt_answers_and_exits(tiny_checkpoint, base_dir):
    proc = cli(base_dir, "-p", "Why is the sky blue?", "--max-tokens", "12", "-i", "sft")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_interactive_session_with_clear_and_quit(tiny_checkpoint, base_dir):
    proc = cli(base_dir, "--max-tokens", "6", stdin="hello\nclear\nhi again\nquit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Assistant:") == 2 and "(conversation cleared)" in proc.stdout


def test_tool_markers_are_shown_distinctly(tiny_tokenizer):
    import io
    from contextlib import redirect_stdout
    from nanochat.terminal import Printer
    out = io.StringIO()
    printer = Printer(tiny_tokenizer, color=False)
    with redirect_stdout(out):
        for t in ([tiny_tokenizer.encode_special("<|python_start|>")] + tiny_tokenizer.encode("1+1")
                  + [tiny_tokenizer.encode_special("<|python_end|>"), tiny_tokenizer.encode_special("<|output_start|>")]
                  + tiny_tokenizer.encode("2") + [tiny_tokenizer.encode_special("<|output_end|>")]):
            printer.feed(t)
        printer.flush()
    assert out.getvalue() == "[python] 1+1 [/python][output] 2 [/output]"


def test_no_checkpoint_gives_one_line_naming_the_command(base_dir):
    proc = cli(base_dir, "-p", "hi")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and "python -m scripts.base_train" in proc.stderr


def test_base_model_continues_text_and_top_k_zero_works(tiny_checkpoint, base_dir):
    proc = cli(base_dir, "-i", "base", "-p", "The capital of France is", "--max-tokens", "8", "--top-k", "0",
               "--temperature", "1.0")
    assert proc.returncode == 0, proc.stderr


def test_dry_run_without_a_checkpoint_warns_and_exits_0(base_dir):
    proc = cli(base_dir, "--dry-run")
    assert proc.returncode == 0 and "warning (dry run)" in proc.stdout


def test_bad_sampling_flags_are_a_one_line_error(base_dir):
    proc = cli(base_dir, "-p", "hi", "--max-tokens", "0")
    assert proc.returncode == 1 and proc.stderr.startswith("error:") and "--max-tokens" in proc.stderr


def test_a_reply_cut_inside_a_tool_call_does_not_leave_the_terminal_coloured(tiny_tokenizer):
    import io
    from contextlib import redirect_stdout
    from nanochat.terminal import RESET, Printer
    out = io.StringIO()
    printer = Printer(tiny_tokenizer, color=True)
    with redirect_stdout(out):
        for t in [tiny_tokenizer.encode_special("<|python_start|>")] + tiny_tokenizer.encode("1+1"):
            printer.feed(t)
        printer.flush()
    assert out.getvalue().startswith("\033[36m") and out.getvalue().endswith("1+1" + RESET)


def test_the_python_tool_sandbox_is_announced_at_start(base_dir):
    """On stderr (so -p's answer stays clean): the layers in force, or, without bubblewrap on PATH, that the tool is
    off and the flag that turns it on anyway."""
    proc = cli(base_dir, "--dry-run", "--device-type", "cpu")
    assert proc.returncode == 0 and "python tool" in proc.stderr and "python tool" not in proc.stdout
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_UNSAFE_PYTHON_TOOL"}
    for flags, expected in (((), "python tool OFF"), (("--unsafe-python-tool",), "python tool UNSAFE")):
        proc = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--dry-run", "--device-type", "cpu", *flags],
                              env={**env, "NANOCHAT_BASE_DIR": str(base_dir), "PATH": ""}, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and expected in proc.stderr and "--unsafe-python-tool" in proc.stderr, proc.stderr
