"""Downloads through a real HTTP server on loopback that serves the mirror, with injected faults."""

import os
import shutil
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat.download import DownloadError, hf_file, zip_member

REPO, SHARD = "nanochat-mirror/docs-dictionary-sample", "shard_00006.parquet"


class FaultyMirror:
    """Serves files under a root; `faults` is a list consumed one per request: None, 'truncate', '500', 'stall',
    'html', 'cut-half' (send half the body and close, then honour Range requests). With `redirect_to` set, the next
    request is answered with a 302 to that base URL plus its path. Records each request's Authorization header."""

    def __init__(self, root: Path, redirect_to: str | None = None):
        self.root, self.faults, self.requests, self.ranges, self.auth = root, [], [], [], []
        self.redirect_to = redirect_to
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(self.path)
                outer.ranges.append(self.headers.get("Range"))
                outer.auth.append(self.headers.get("Authorization"))
                if outer.redirect_to:
                    target, outer.redirect_to = outer.redirect_to + self.path, None
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                fault = outer.faults.pop(0) if outer.faults else None
                path = outer.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                if fault == "500":
                    self.send_error(500)
                    return
                if fault == "html":
                    body = b"<html><body>Rate limited</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and fault != "ignore-range":
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if fault in ("truncate", "cut-half"):
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    return
                if fault == "stall":
                    self.wfile.write(body[:1000])
                    self.wfile.flush()
                    threading.Event().wait(3)
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def server(mirror, monkeypatch):
    s = FaultyMirror(mirror)
    monkeypatch.setenv("NANOCHAT_MIRROR", s.url)
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_TIMEOUT", "1")
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_RETRIES", "4")
    yield s
    s.close()


@pytest.fixture
def hub(mirror, tmp_path, monkeypatch):
    """A fake Hugging Face Hub at HF_ENDPOINT serving the shard at its resolve URL; no mirror, no token."""
    served = tmp_path / "hub" / "datasets" / REPO / "resolve" / "main" / SHARD
    served.parent.mkdir(parents=True)
    shutil.copyfile(mirror / "hf/datasets" / REPO / SHARD, served)
    s = FaultyMirror(tmp_path / "hub")
    for name in ("NANOCHAT_MIRROR", "HF_TOKEN", "HF_HUB_OFFLINE", "NANOCHAT_HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", s.url)
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_TIMEOUT", "1")
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_RETRIES", "2")
    yield s
    s.close()


def cached(base_dir: Path) -> Path:
    return base_dir / "hf" / "datasets" / REPO / SHARD


def assert_identical(path: Path, mirror: Path):
    assert path.read_bytes() == (mirror / "hf/datasets" / REPO / SHARD).read_bytes()
    pq.ParquetFile(path).metadata


def test_plain_download_lands_verified_in_the_cache(server, base_dir, mirror):
    path = hf_file(REPO, SHARD)
    assert path == cached(base_dir)
    assert_identical(path, mirror)
    assert hf_file(REPO, SHARD) == path and len(server.requests) == 1  # cached: no second request


def test_server_error_then_success_is_retried(server, base_dir, mirror):
    server.faults = ["500", None]
    assert_identical(hf_file(REPO, SHARD), mirror)
    assert len(server.requests) == 2


def test_truncated_body_resumes_with_a_range_request(server, base_dir, mirror):
    server.faults = ["cut-half", None]
    assert_identical(hf_file(REPO, SHARD), mirror)
    assert server.ranges[0] is None and server.ranges[1] and server.ranges[1].startswith("bytes=")


def test_server_ignoring_range_restarts_cleanly(server, base_dir, mirror):
    server.faults = ["cut-half", "ignore-range"]
    assert_identical(hf_file(REPO, SHARD), mirror)


def test_stalled_connection_times_out_and_retries(server, base_dir, mirror):
    server.faults = ["stall", None]
    assert_identical(hf_file(REPO, SHARD), mirror)


def test_wrong_content_never_lands_in_the_cache(server, base_dir):
    server.faults = ["html"] * 4
    with pytest.raises(DownloadError) as err:
        hf_file(REPO, SHARD)
    assert "\n" not in str(err.value) and "did not verify" in str(err.value)
    assert not cached(base_dir).exists()
    assert not list(cached(base_dir).parent.glob("*.part"))


def test_persistent_truncation_fails_without_a_corrupt_file(server, base_dir):
    server.faults = ["truncate"] * 4
    with pytest.raises(DownloadError):
        hf_file(REPO, SHARD)
    assert not cached(base_dir).exists()


def test_missing_file_is_one_clear_line(server, base_dir):
    with pytest.raises(DownloadError) as err:
        hf_file(REPO, "shard_99999.parquet")
    message = str(err.value)
    assert "\n" not in message and "shard_99999.parquet" in message and "HTTP 404" in message


def test_missing_file_in_a_directory_mirror_names_the_fix(mirror, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(mirror))
    with pytest.raises(DownloadError, match="NANOCHAT_MIRROR"):
        hf_file("HuggingFaceTB/smol-smoltalk", "data/train-00000-of-00004.parquet")


def test_unreachable_source_without_mirror_suggests_the_mirror(base_dir, monkeypatch):
    monkeypatch.delenv("NANOCHAT_MIRROR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_RETRIES", "1")
    with pytest.raises(DownloadError, match="NANOCHAT_MIRROR"):
        hf_file(REPO, SHARD)


def test_hub_files_come_from_hf_endpoint(hub, base_dir, mirror):
    assert_identical(hf_file(REPO, SHARD), mirror)
    assert hub.requests == [f"/datasets/{REPO}/resolve/main/{SHARD}"]


def test_hf_token_is_sent_to_the_hub_endpoint(hub, base_dir, mirror, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert_identical(hf_file(REPO, SHARD), mirror)
    assert hub.auth == ["Bearer hf_secret"]


def test_hf_token_never_goes_to_a_mirror(server, base_dir, mirror, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert_identical(hf_file(REPO, SHARD), mirror)
    assert server.auth == [None]


def test_hf_token_does_not_follow_a_redirect_to_another_host(hub, base_dir, mirror, tmp_path, monkeypatch):
    """The Hub answers file downloads with a redirect to its CDN, which must not see the token."""
    front = FaultyMirror(tmp_path, redirect_to=hub.url)  # the Hub; `hub` plays its CDN (another port)
    try:
        monkeypatch.setenv("HF_ENDPOINT", front.url)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        assert_identical(hf_file(REPO, SHARD), mirror)
        assert front.auth == ["Bearer hf_secret"] and hub.auth == [None]
    finally:
        front.close()


def test_hf_token_follows_a_redirect_on_the_hub_itself(hub, base_dir, mirror, tmp_path, monkeypatch):
    shutil.copytree(tmp_path / "hub" / "datasets", tmp_path / "hub" / "moved" / "datasets")
    hub.redirect_to = hub.url + "/moved"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert_identical(hf_file(REPO, SHARD), mirror)
    assert hub.auth == ["Bearer hf_secret"] * 2 and hub.requests[1].startswith("/moved/")


def test_hub_offline_fails_in_one_line_without_a_request(hub, base_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError) as err:
        hf_file(REPO, SHARD)
    message = str(err.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and "NANOCHAT_MIRROR" in message
    assert hub.requests == [] and not cached(base_dir).exists()


def test_zip_member_is_extracted_once_from_the_downloaded_zip(hub, base_dir, tmp_path):
    with zipfile.ZipFile(tmp_path / "hub" / "bundle.zip", "w") as z:
        z.writestr("bundle/core.yaml", "icl_tasks: []\n")
        z.writestr("bundle/eval_data/a.jsonl", "{}\n")
    url = hub.url + "/bundle.zip"
    assert zip_member("bundle", url, "core.yaml").read_text() == "icl_tasks: []\n"
    assert zip_member("bundle", url, "eval_data/a.jsonl") == base_dir / "bundle" / "eval_data" / "a.jsonl"
    assert len(hub.requests) == 1
    with pytest.raises(DownloadError, match="bundle/eval_data/missing.jsonl"):
        zip_member("bundle", url, "eval_data/missing.jsonl")


def _fetch_in_process(base: str, url: str, queue):
    os.environ.update(NANOCHAT_BASE_DIR=base, NANOCHAT_MIRROR=url)
    queue.put(str(hf_file(REPO, SHARD)))


def test_concurrent_processes_download_once(server, base_dir, mirror):
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_process, args=(str(base_dir), server.url, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len({queue.get() for _ in procs}) == 1
    assert len(server.requests) == 1
    assert_identical(cached(base_dir), mirror)


def test_offline_and_has_answer_from_the_mirror_without_the_network(mirror, base_dir, monkeypatch):
    from nanochat.download import has, offline
    monkeypatch.setenv("NANOCHAT_MIRROR", str(mirror))
    assert offline() and has(REPO, SHARD)
    assert not has("HuggingFaceTB/smol-smoltalk", "data/train-00000-of-00004.parquet")
    monkeypatch.delenv("NANOCHAT_MIRROR")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline() and not has(REPO, SHARD)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not offline() and has(REPO, SHARD)  # online: assumed there, and fetched when asked
