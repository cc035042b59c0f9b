"""The chat page in a real browser (Debian's Chromium driven by Playwright): type, stream, stop, regenerate, edit,
tool parts, the stream parser and the markdown renderer, at desktop and phone width. Saved conversations, settings
and the model header: test_ui_chats.py."""

import json
import os
import shutil

import pytest

from webserver import ChatServer, save_long_talking_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BUBBLE = "document.querySelector('.msg.assistant .bubble')"


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    """A tiny model whose replies run to max_tokens, so there is always time to press stop."""
    base = tmp_path_factory.mktemp("ui")
    save_long_talking_model(base, tiny_tokenizer)
    s = ChatServer(base, "--max-tokens", "4000", "--slots", "2")
    yield s
    s.stop()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url)
    yield page
    context.close()


def assistant_text(page) -> str:
    return page.inner_text(".msg.assistant .bubble")


def test_type_stream_stop_and_regenerate(page):
    page.fill("#input", "Why is the sky blue?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.user .bubble")
    assert page.inner_text(".msg.user .bubble") == "Why is the sky blue?"
    page.wait_for_function(f"{BUBBLE}.innerText.length > 20")  # streamed tokens appear…
    assert page.is_visible("#stop") and not page.is_visible("#send")  # …while the reply is still running
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    stopped = assistant_text(page)
    assert "(stopped)" in stopped and "Error" not in stopped
    page.wait_for_timeout(300)
    assert assistant_text(page) == stopped  # nothing more arrives after stop
    page.click("button.regenerate")
    page.wait_for_function(f"{BUBBLE}.innerText.length > 20 && !{BUBBLE}.innerText.includes('(stopped)')")
    page.click("#stop")
    page.wait_for_selector("button.regenerate")
    assert len(page.query_selector_all(".msg.assistant")) == 1 and len(page.query_selector_all(".msg.user")) == 1
    assert assistant_text(page) != stopped


def test_edit_and_resend_replaces_the_rest_of_the_conversation(page):
    page.fill("#input", "first question")
    page.press("#input", "Enter")
    page.wait_for_function(f"{BUBBLE} && {BUBBLE}.innerText.length > 5")
    page.press("#input", "Escape")  # Escape stops too
    page.wait_for_selector("button.edit-message")
    page.click("button.edit-message")
    page.fill(".msg.edit textarea", "second question")
    page.click("button.save-edit")
    page.wait_for_function(f"{BUBBLE} && {BUBBLE}.innerText.length > 5")
    page.click("#stop")
    page.wait_for_selector("button.regenerate")
    assert page.inner_text(".msg.user .bubble") == "second question"
    assert len(page.query_selector_all(".msg")) == 2


def test_user_text_is_shown_as_text_not_html(page):
    page.fill("#input", "<b>bold?</b> <img src=x onerror=\"document.title='pwned'\">")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.user .bubble")
    page.click("#stop")
    assert page.query_selector(".msg.user .bubble b") is None and page.query_selector(".msg img") is None
    assert page.inner_text(".msg.user .bubble").startswith("<b>bold?</b>") and page.title() == "nanochat"


def test_tool_calls_and_outputs_are_shown_distinctly(page):
    """A canned stream (as the server sends it for a reply that used the tool), delivered by the browser's router."""
    events = [{"part": "text", "delta": "Let me compute."}, {"part": "python", "delta": ""},
              {"part": "python", "delta": "6*7"}, {"part": "text", "delta": ""},
              {"part": "python_output", "delta": ""}, {"part": "python_output", "delta": "42"},
              {"part": "text", "delta": ""}, {"part": "text", "delta": " The answer is **42**."},
              {"done": True, "finish_reason": "stop"}]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    page.route("**/chat/completions", lambda route: route.fulfill(status=200, body=body,
                                                                  headers={"Content-Type": "text/event-stream"}))
    page.fill("#input", "What is 6*7?")
    page.press("#input", "Enter")
    page.wait_for_selector("button.regenerate")
    assert page.inner_text(".msg.assistant .tool.python").endswith("6*7")
    assert page.inner_text(".msg.assistant .tool.python_output").endswith("42")
    assert page.inner_text(".msg.assistant strong") == "42"
    sent = []
    page.route("**/chat/completions", lambda route: (sent.append(route.request.post_data_json),
                                                     route.fulfill(status=200, body=body)))
    page.click("button.regenerate")
    page.wait_for_selector("button.regenerate")
    assert sent[0]["messages"] == [{"role": "user", "content": "What is 6*7?"}]
    page.fill("#input", "And 7*8?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.user >> nth=1")
    page.wait_for_selector("button.regenerate")
    assert sent[1]["messages"][1] == {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."}, {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"}, {"type": "text", "text": " The answer is **42**."}]}


def test_a_server_error_is_shown(page):
    page.route("**/chat/completions", lambda route: route.fulfill(
        status=400, body=json.dumps({"error": {"message": "too many messages: 501 > 500"}}),
        headers={"Content-Type": "application/json"}))
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .error")
    assert "too many messages" in page.inner_text(".msg.assistant .error")


def test_the_stream_parser_handles_events_split_anywhere(page):
    """Regression: the reference page lost events whose line was split across network chunks."""
    stream = 'data: {"a": 1}\n\ndata: {"b": "x\\ny"}\r\n\r\n: comment\ndata: {"c":\ndata: 3}\n\ndata: [DONE]\n\n'
    events = page.evaluate("""(stream) => {
        const runs = [];
        for (let i = 0; i <= stream.length; i++) {
          for (let j = i; j <= stream.length; j += 7) {
            const got = [], push = window.nanochat.createSSEParser(d => got.push(d));
            push(stream.slice(0, i)); push(stream.slice(i, j)); push(stream.slice(j));
            runs.push(JSON.stringify(got));
          }
        }
        return [...new Set(runs)];
    }""", stream)
    assert events == [json.dumps(['{"a": 1}', '{"b": "x\\ny"}', '{"c":\n3}', "[DONE]"], separators=(",", ":"))]


def test_markdown_renderer_escapes_html_and_renders_code(page):
    html = page.evaluate("""() => window.nanochat.renderMarkdown(
        "# Title\\n<script>alert(1)</script> **bold** and `<i>code</i>`\\n\\n- one\\n- two\\n\\n1. first\\n\\n" +
        "```python\\nprint('<b>')\\n```\\n[link](javascript:alert(1)) [ok](https://example.com/a?b=1&c=2)")""")
    assert "<script" not in html and "&lt;script&gt;" in html
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html
    assert "<code>&lt;i&gt;code&lt;/i&gt;</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>first</li></ol>" in html
    assert '<pre data-lang="python"><code>print(&#39;&lt;b&gt;&#39;)</code></pre>' in html
    assert 'href="javascript' not in html and 'href="https://example.com/a?b=1&amp;c=2"' in html


def test_new_chat_and_phone_width_layout(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 800}, is_mobile=True)
    page = context.new_page()
    page.goto(server.url)
    page.fill("#input", "hello " * 30)
    page.click("#send")
    page.wait_for_function(f"{BUBBLE} && {BUBBLE}.innerText.length > 200")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
    for selector in ("#stop", "#new-chat", "#settings-button", "#toggle-sidebar"):
        box = page.query_selector(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
    page.click("#stop")
    page.click("#new-chat")
    assert page.query_selector(".msg") is None and page.is_visible("#empty")
    assert page.is_visible("#model") and page.is_hidden("#sidebar")  # the side panel opens from the ☰ button
    page.screenshot(path=os.path.join(os.environ.get("TMPDIR", "/tmp"), "nanochat-ui-phone.png"))
    page.click("#toggle-sidebar")
    assert page.query_selector("#sidebar").bounding_box()["width"] <= 390
    page.click(".conversation .open-chat")
    assert page.inner_text(".msg.user .bubble").startswith("hello hello") and page.is_hidden("#sidebar")
    context.close()
