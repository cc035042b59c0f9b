"""chat_cli as a user runs it: one prompt, the interactive loop with clear/quit, and a clear error without a model."""

import os
import subprocess
import sys

import pytest


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
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "python -m scripts.base_train" in errors[0] and "Traceback" not in proc.stderr


def test_no_checkpoint_names_the_base_dir_and_the_stages_and_creates_nothing(tmp_path):
    missing = tmp_path / "never-made"
    proc = cli(missing, "-p", "hi")
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(error) == 1, proc.stderr
    assert str(missing) in error[0] and "NANOCHAT_BASE_DIR" in error[0]
    assert "chatrl_checkpoints/, chatsft_checkpoints/, base_checkpoints/" in error[0]
    assert not missing.exists(), "looking for a checkpoint created the base directory"


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
    assert out.getvalue() == "\033[36m[python] 1+1 [/python]" + RESET  # brackets too: copied text keeps them


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


# Conversations longer than the context, and the terminal as people use it


def test_a_conversation_over_the_prompt_budget_drops_its_oldest_turns_but_not_the_system_prompt(tiny_tokenizer):
    from nanochat.common import UserError
    system = {"role": "system", "content": "Be brief."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " * 8}, {"role": "assistant", "content": f"answer {i}"}]
    turns.append({"role": "user", "content": "the last question"})
    whole = tiny_tokenizer.render_for_completion({"messages": [system, *turns]})
    ids, dropped = tiny_tokenizer.render_within({"messages": [system, *turns]}, len(whole))
    assert (ids, dropped) == (whole, 0)
    ids, dropped = tiny_tokenizer.render_within({"messages": [system, *turns]}, len(whole) - 1)
    assert dropped == 2 and ids == tiny_tokenizer.render_for_completion({"messages": [system, *turns[2:]]})
    shortest = tiny_tokenizer.render_for_completion({"messages": [system, turns[-1]]})
    ids, dropped = tiny_tokenizer.render_within({"messages": [system, *turns]}, len(shortest))
    assert dropped == 12 and ids == shortest
    with pytest.raises(UserError, match="shorten it"):
        tiny_tokenizer.render_within({"messages": [system, *turns]}, len(shortest) - 1)


def test_an_interactive_session_names_the_model_keeps_a_history_and_drops_what_outgrows_the_context(
        tiny_checkpoint, base_dir):
    long_message = "tell me about the history of the river and its bridges " * 3  # about 40 tokens of 128
    stdin = "first line \\\nsecond line\n" + (long_message + "\n") * 4 + "quit\n"
    proc = cli(base_dir, "-i", "sft", "--max-tokens", "6", "--system", "Be brief.", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("nanochat: d2 sft step 1 (2 layers") and "context 128 tokens" in first
    assert "a tiny model" in proc.stdout.splitlines()[1]
    assert proc.stdout.count("Assistant:") == 5
    assert "the conversation outgrew the model's context of 128 tokens" in proc.stderr
    history = (base_dir / "chat_history").read_text()
    assert "first line" in history and "second line" in history and "tell me about the history" in history


def test_a_reply_cut_at_the_token_limit_says_so(tiny_checkpoint, base_dir):
    proc = cli(base_dir, "-i", "sft", "-p", "Why is the sky blue?", "--max-tokens", "3", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "(reply cut at 3 tokens by --max-tokens)" in proc.stderr
    assert "nanochat: d2 sft step 1" in proc.stderr and "nanochat:" not in proc.stdout  # -p output stays clean


def test_a_prompt_longer_than_the_context_is_an_error_not_an_empty_reply(tiny_checkpoint, base_dir):
    proc = cli(base_dir, "-i", "sft", "-p", "word " * 400)
    assert proc.returncode != 0
    assert "more than the" in proc.stderr and "shorten it" in proc.stderr and not proc.stdout.strip()
