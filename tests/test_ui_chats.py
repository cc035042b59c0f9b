"""The chat page's conversations and settings in a real browser (Debian's Chromium driven by Playwright): saved in
localStorage and restored on reload, switched, renamed, deleted and exported from the side panel; copy buttons; the
model, its stage and context shown; settings kept per browser; and what the page says when the server is down or
busy. Screenshots go to $TMPDIR (default /tmp) as nanochat-ui-*.png."""

import json
import os

import httpx
import pytest

from test_ui_browser import BUBBLE, browser, server  # noqa: F401 (fixtures)
from webserver import ChatServer, save_long_talking_model

SHOTS = os.environ.get("TMPDIR", "/tmp")


def canned(*events) -> str:
    """A reply as the server streams it to the page (POST /chat/completions)."""
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events)


def reply(text: str, **done) -> str:
    return canned({"part": "text", "delta": text}, {"done": True, "finish_reason": "stop", **done})


def answer_with(page, body: str, sent: list | None = None):
    def fulfill(route):
        if sent is not None:
            sent.append(route.request.post_data_json)
        route.fulfill(status=200, body=body, headers={"Content-Type": "text/event-stream"})
    page.route("**/chat/completions", fulfill)


def ask(page, text: str):
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_selector("button.regenerate")


def titles(page) -> list[str]:
    return page.eval_on_selector_all("#conversations .open-chat", "bs => bs.map(b => b.textContent)")


@pytest.fixture
def context(browser, server):  # noqa: F811
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    yield context
    context.close()


@pytest.fixture
def page(context, server):  # noqa: F811
    page = context.new_page()
    page.goto(server.url)
    page.wait_for_function("document.getElementById('model').textContent !== ''")
    return page


def test_the_server_describes_its_model_for_the_page(server):  # noqa: F811
    model = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert (model["stage"], model["tag"], model["step"], model["context"]) == ("sft", "d2", 1, 8192)
    assert "tiny model" in model["expectation"] and "context 8192 tokens" in model["description"]
    health = httpx.get(server.url + "/health").json()
    assert health["context"] == 8192 and health["expectation"] == model["expectation"]


def test_the_page_shows_the_model_its_stage_what_to_expect_and_the_context(page, server):  # noqa: F811
    model = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert page.inner_text("#model") == f"{model['id']} · sft step 1"
    assert page.is_hidden("#model-select")  # one model: a label, no selector
    assert "tiny model" in page.inner_text("#expectation")
    assert page.inner_text("#context-text") == "context: 0 of 8192 tokens (0%)"


def test_with_an_api_key_the_model_is_named_from_health(page, server):  # noqa: F811
    """/v1/models needs the key (asked for at the first message); /health, which does not, names the model too."""
    page.route("**/v1/models", lambda route: route.fulfill(status=401, body="{}"))
    page.reload()
    page.wait_for_function("document.getElementById('model').textContent !== ''")
    model = httpx.get(server.url + "/health").json()["model"]
    assert page.inner_text("#model") == f"{model} · sft step 1" and "tiny model" in page.inner_text("#expectation")


def test_a_reply_cut_at_max_tokens_says_so_and_the_meter_counts_the_exchange(page):
    page.click("#settings-button")
    page.fill("#max-tokens", "5")
    ask(page, "Tell me a long story")
    assert "cut at the token limit" in page.inner_text(".msg.assistant .note")
    used = page.inner_text("#context-text")
    assert used.startswith("context: ") and "~" not in used and " of 8192 tokens" in used
    assert 5 < int(used.split()[1]) < 40  # the prompt's tokens and the reply's 5, as the server counted them


def test_a_reload_restores_conversations_and_the_side_panel_switches_between_them(page):
    page.fill("#input", "first chat")
    page.press("#input", "Enter")
    page.wait_for_function(f"{BUBBLE} && {BUBBLE}.innerText.length > 20")
    page.click("#stop")
    page.wait_for_selector("button.regenerate")
    first_reply = page.inner_text(".msg.assistant .bubble")
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.inner_text(".msg.user .bubble") == "first chat"
    assert page.inner_text(".msg.assistant .bubble") == first_reply
    assert titles(page) == ["first chat"]

    answer_with(page, reply("Second answer."))
    page.click("#new-chat")
    assert page.is_visible("#empty")
    ask(page, "second chat")
    assert titles(page) == ["second chat", "first chat"]
    assert page.inner_text(".conversation.active .open-chat") == "second chat"
    page.click(".conversation:has-text('first chat') .open-chat")
    assert page.inner_text(".msg.user .bubble") == "first chat"
    page.reload()  # the conversation open before the reload is open after it
    page.wait_for_selector(".msg.user")
    assert page.inner_text(".msg.user .bubble") == "first chat"
    page.click(".conversation:has-text('second chat') .open-chat")
    assert page.inner_text(".msg.assistant .bubble").startswith("Second answer.")
    page.screenshot(path=os.path.join(SHOTS, "nanochat-ui-conversations.png"))


def test_a_reply_interrupted_by_a_reload_keeps_its_text_and_says_so(page):
    page.fill("#input", "tell me everything")
    page.press("#input", "Enter")
    page.wait_for_function(f"{BUBBLE} && {BUBBLE}.innerText.length > 20")
    page.reload()
    page.wait_for_selector(".msg.assistant .note")
    assert "interrupted" in page.inner_text(".msg.assistant .note")
    assert len(page.inner_text(".msg.assistant .bubble")) > 20 + len(page.inner_text(".msg.assistant .note"))
    assert page.is_visible("button.regenerate") and page.is_visible("#send")
    assert page.query_selector(".msg.assistant .error") is None


def test_two_tabs_keep_each_others_conversations(context, page, server):  # noqa: F811
    other = context.new_page()  # same browser profile, same localStorage
    other.goto(server.url)
    for tab, text in ((page, "from the first tab"), (other, "from the second tab")):
        answer_with(tab, reply("ok"))
        ask(tab, text)
    page.wait_for_function("document.querySelectorAll('#conversations .open-chat').length === 2")
    ask(page, "and more from the first")  # its save must not drop the other tab's conversation
    other.reload()
    other.wait_for_selector(".conversation >> nth=1")
    assert sorted(titles(other)) == ["from the first tab", "from the second tab"]
    other.click(".conversation:has-text('from the first tab') .open-chat")
    assert len(other.query_selector_all(".msg.user")) == 2


def test_unreadable_saved_conversations_are_kept_aside_and_named(page):
    page.evaluate("localStorage.setItem('nanochat-conversations', '[{\"id\": broken')")
    page.reload()
    page.wait_for_selector("#banner")
    assert "could not be read" in page.inner_text("#banner") and page.is_visible("#empty")
    assert page.evaluate("localStorage.getItem('nanochat-conversations-unreadable')") == '[{"id": broken'
    answer_with(page, reply("ok"))
    ask(page, "a fresh start")
    page.reload()
    page.wait_for_selector(".msg.user")
    assert titles(page) == ["a fresh start"] and page.is_hidden("#banner")


def test_conversations_are_renamed_and_deleted(page):
    answer_with(page, reply("ok"))
    ask(page, "keep me")
    page.click("#new-chat")
    ask(page, "delete me")
    page.click(".conversation:has-text('keep me') .rename-chat")
    page.fill(".conversation input", "Renamed chat")
    page.press(".conversation input", "Enter")
    assert titles(page) == ["delete me", "Renamed chat"]
    page.on("dialog", lambda dialog: dialog.accept())
    page.click(".conversation:has-text('delete me') .delete-chat")
    assert titles(page) == ["Renamed chat"]
    assert page.inner_text(".msg.user .bubble") == "keep me"  # the open one was deleted: the next one opens
    page.reload()
    page.wait_for_selector(".conversation")
    assert titles(page) == ["Renamed chat"]


def test_a_conversation_exports_as_markdown_and_json(page):
    answer_with(page, canned({"part": "text", "delta": "Run this:\n\n```python\nprint(6*7)\n```\n"},
                             {"part": "python", "delta": ""}, {"part": "python", "delta": "6*7"},
                             {"part": "python_output", "delta": ""}, {"part": "python_output", "delta": "42"},
                             {"done": True, "finish_reason": "stop"}))
    ask(page, "What is 6*7?")
    with page.expect_download() as download:
        page.click("#export-md")
    assert download.value.suggested_filename == "What-is-6-7.md"
    markdown = open(download.value.path()).read()
    assert markdown.startswith("# What is 6*7?\n") and "## User\n\nWhat is 6*7?" in markdown
    assert "## Assistant\n\nRun this:\n\n```python\nprint(6*7)\n```" in markdown
    assert "```python\n6*7\n```" in markdown and "```text\n42\n```" in markdown
    with page.expect_download() as download:
        page.click("#export-json")
    exported = json.load(open(download.value.path()))
    assert exported["title"] == "What is 6*7?" and exported["model"].endswith("-sft")
    assert exported["messages"] == [{"role": "user", "content": "What is 6*7?"}, {"role": "assistant", "content": [
        {"type": "text", "text": "Run this:\n\n```python\nprint(6*7)\n```\n"}, {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"}]}]


def test_copy_buttons_copy_a_code_block_and_a_whole_message(context, page):
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    answer_with(page, canned({"part": "text", "delta": "Here:\n```python\nprint('hi')\n```\nDone."},
                             {"part": "python", "delta": ""}, {"part": "python", "delta": "1+1"},
                             {"part": "python_output", "delta": ""}, {"part": "python_output", "delta": "2"},
                             {"done": True, "finish_reason": "stop"}))
    ask(page, "show code")
    page.click(".msg.assistant pre .copy-code")
    assert page.evaluate("navigator.clipboard.readText()") == "print('hi')"
    assert page.inner_text(".msg.assistant pre .copy-code") == "Copied"
    page.click(".msg.assistant .copy-message")
    assert page.evaluate("navigator.clipboard.readText()") == (
        "Here:\n```python\nprint('hi')\n```\nDone.[python]\n1+1\n[/python][output]\n2\n[/output]")
    page.click(".msg.user .copy-message")
    assert page.evaluate("navigator.clipboard.readText()") == "show code"
    page.click("#settings-button")
    page.screenshot(path=os.path.join(SHOTS, "nanochat-ui-code-and-settings.png"))


def test_settings_are_kept_per_browser_and_sent_with_each_request(page):
    page.click("#settings-button")
    page.eval_on_selector("#temperature", "el => { el.value = '0.3'; el.dispatchEvent(new Event('input')); }")
    page.fill("#top-k", "7")
    page.fill("#max-tokens", "33")
    page.reload()
    page.wait_for_function("document.getElementById('model').textContent !== ''")
    assert page.input_value("#temperature") == "0.3" and page.inner_text("#temperature-value") == "0.3"
    assert page.input_value("#top-k") == "7" and page.input_value("#max-tokens") == "33"
    sent = []
    answer_with(page, reply("fine"), sent)
    ask(page, "hello")
    model = page.inner_text("#model").split(" · ")[0]
    assert {k: sent[0][k] for k in ("temperature", "top_k", "max_tokens", "model")} == {
        "temperature": 0.3, "top_k": 7, "max_tokens": 33, "model": model}
    page.click("#settings-button")
    page.click("#reset-settings")
    page.reload()
    assert page.input_value("#top-k") == "50" and page.input_value("#max-tokens") == "512"


def test_several_models_get_a_selector_and_the_chosen_one_is_asked(page, server):  # noqa: F811
    models = {"object": "list", "data": [
        {"id": "nanochat-d20-sft", "object": "model", "stage": "sft", "tag": "d20", "step": 700, "context": 2048},
        {"id": "nanochat-d20-rl", "object": "model", "stage": "rl", "tag": "d20", "step": 466, "context": 2048}]}
    page.route("**/v1/models", lambda route: route.fulfill(status=200, body=json.dumps(models),
                                                           headers={"Content-Type": "application/json"}))
    page.reload()
    page.wait_for_selector("#model-select >> option >> nth=1", state="attached")
    assert page.is_visible("#model-select") and page.is_hidden("#model") and page.is_hidden("#expectation")
    assert page.eval_on_selector_all("#model-select option", "os => os.map(o => o.textContent)") == [
        "nanochat-d20-sft · sft step 700", "nanochat-d20-rl · rl step 466"]
    page.select_option("#model-select", "nanochat-d20-rl")
    assert page.inner_text("#context-text") == "context: 0 of 2048 tokens (0%)"
    sent = []
    answer_with(page, reply("hi", dropped_messages=2), sent)
    ask(page, "which model?")
    assert sent[0]["model"] == "nanochat-d20-rl"
    assert "2 oldest messages were left out" in page.inner_text(".msg.assistant .note")  # an end event's extra field
    page.reload()  # the choice is kept
    page.wait_for_selector("#model-select >> option >> nth=1", state="attached")
    assert page.input_value("#model-select") == "nanochat-d20-rl"


def test_the_context_meter_warns_when_the_conversation_fills_the_context(page):
    models = {"object": "list", "data": [{"id": "small", "object": "model", "context": 64}]}  # an id-only server too
    page.route("**/v1/models", lambda route: route.fulfill(status=200, body=json.dumps(models),
                                                           headers={"Content-Type": "application/json"}))
    page.reload()
    page.wait_for_function("document.getElementById('model').textContent === 'small'")
    answer_with(page, reply("ok", usage={"prompt_tokens": 40, "completion_tokens": 4}))
    ask(page, "hi")
    assert page.inner_text("#context-text") == "context: 44 of 64 tokens (69%)"
    assert "full" not in (page.get_attribute("#context", "class") or "")
    answer_with(page, reply("ok", usage={"prompt_tokens": 60, "completion_tokens": 4}))
    ask(page, "again")
    assert page.inner_text("#context-text") == "context: 64 of 64 tokens (100%): the oldest messages no longer fit"
    assert "full" in page.get_attribute("#context", "class")
    answer_with(page, reply("ok", nanochat={"dropped_messages": 2, "context": 64, "prompt_tokens": 50}))
    ask(page, "and again")  # the server dropped the two oldest messages to fit: the reply says so
    assert "the 2 oldest messages were left out to fit the model's context" in page.inner_text(".msg.assistant >> nth=-1")


def test_a_busy_server_is_named_as_busy(page):
    page.route("**/chat/completions", lambda route: route.fulfill(status=429, body=json.dumps({"error": {
        "message": "too many concurrent generations from this client (16 running, limit 16): wait for one to finish",
        "type": "invalid_request_error", "param": None}}), headers={"Content-Type": "application/json"}))
    ask(page, "hi")
    error = page.inner_text(".msg.assistant .error")
    assert "server is busy (429)" in error and "wait for one to finish" in error and "press Regenerate" in error
    assert page.is_visible("#banner")


def test_a_server_that_went_away_is_named_unreachable(browser, tmp_path, tiny_tokenizer):  # noqa: F811
    save_long_talking_model(tmp_path, tiny_tokenizer)
    gone = ChatServer(tmp_path)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(gone.url)
        page.wait_for_function("document.getElementById('model').textContent !== ''")
        gone.stop()
        ask(page, "are you there?")
        error = page.inner_text(".msg.assistant .error")
        assert "Cannot reach the nanochat server" in error and "is chat_web still running?" in error
        assert page.inner_text("#banner") == error.removeprefix("Error: ")
        page.screenshot(path=os.path.join(SHOTS, "nanochat-ui-server-down.png"))
    finally:
        gone.stop()
        context.close()
