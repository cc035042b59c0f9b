"""The chat page in a real browser (Debian's Chromium driven by Playwright): type, stream, stop, regenerate."""

import os
import shutil

import pytest
from webserver import ChatServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("NANOCHAT_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def server(tiny_checkpoint, base_dir):
    """A tiny long-context model whose stop tokens get logit 0 while about half of the others are above it, so top-k
    sampling never stops early: replies stream long enough to be stopped."""
    import torch
    from conftest import make_tiny_model
    from nanochat.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.tokenizer import get_tokenizer
    model = make_tiny_model(tiny_checkpoint.config.vocab_size, sequence_len=8192)
    tok = get_tokenizer()
    with torch.no_grad():
        for name in ("<|assistant_end|>", "<|bos|>", "<|python_start|>"):
            model.lm_head.weight[tok.encode_special(name)] = 0.0
    save_checkpoint(checkpoint_dir("rl", "d2"), 2, model, {"model_config": vars(model.config), "model_tag": "d2",
                                                           "args": {}, "curves": {}})
    s = ChatServer(base_dir, "--max-tokens", "4000", "--slots", "2")
    yield s
    s.stop()


def test_type_stream_stop_and_regenerate(browser, server):
    page = browser.new_page()
    page.goto(server.url)
    page.fill("#input", "Why is the sky blue?")
    page.press("#input", "Enter")
    assert page.is_visible("#stop")
    page.wait_for_selector(".msg.user .bubble")
    assert page.inner_text(".msg.user .bubble") == "Why is the sky blue?"
    page.wait_for_function("document.querySelector('.msg.assistant .bubble').innerText.length > 5")
    assert page.is_visible("#stop"), page.inner_html("#chat")[-600:]
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    stopped = page.inner_text(".msg.assistant .bubble")
    assert stopped and "Error" not in stopped
    page.wait_for_timeout(500)
    assert page.inner_text(".msg.assistant .bubble") == stopped  # nothing more arrives after stop
    page.click("button.regenerate")
    page.wait_for_function("document.querySelector('.msg.assistant .bubble').innerText.length > 5")
    page.wait_for_selector("button.regenerate", timeout=60000)  # the regenerated reply streamed to its end
    assert len(page.query_selector_all(".msg.assistant")) == 1
    assert page.inner_text(".msg.assistant .bubble") != stopped


def test_new_chat_and_phone_width_layout(browser, server):
    page = browser.new_page(viewport={"width": 390, "height": 800})
    page.goto(server.url)
    page.fill("#input", "hello")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant .bubble').innerText.length > 0")
    page.click("#stop")
    page.click("#new-chat")
    assert page.query_selector(".msg") is None and page.is_visible("#empty")
    box = page.query_selector("#send").bounding_box()
    assert box["x"] + box["width"] <= 390
    page.screenshot(path=str(server.url and os.path.join(os.environ.get("TMPDIR", "/tmp"), "nanochat-ui.png")))
