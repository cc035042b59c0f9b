"""The chat page's conversations and settings in a real browser (Debian's Chromium driven by Playwright): saved in
localStorage and restored on reload, switched, renamed, deleted and exported from the side panel; copy buttons; the
model, its stage and context shown; settings kept per browser; and what the page says when the server is down or
busy. Screenshots go to $TMPDIR (default /tmp) as nanochat-ui-*.png."""

import httpx

from test_ui_browser import server  # noqa: F401 (fixture)


def test_the_server_describes_its_model_for_the_page(server):  # noqa: F811
    model = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert (model["stage"], model["tag"], model["step"], model["context"]) == ("sft", "d2", 1, 8192)
    assert "tiny model" in model["expectation"] and "context 8192 tokens" in model["description"]
    health = httpx.get(server.url + "/health").json()
    assert health["context"] == 8192 and health["expectation"] == model["expectation"]
