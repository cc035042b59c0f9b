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
    from scripts.chat_cli import Printer
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
