"""The one place files come from the network: Hugging Face datasets and a few other files, or an offline mirror.

The environment it reads (nothing else in nanochat interprets these; callers ask `offline()` and `has()`):
- `NANOCHAT_MIRROR` (a directory or an http:// base URL) replaces the real sources; its layout is the mirror's:
  `hf/datasets/<repo>/<path>` for Hub datasets, `files/<path>` for the rest (zips unpacked, see `zip_member`).
- `HF_ENDPOINT`: the Hub's base URL (default https://huggingface.co).
- `HF_TOKEN`: sent as `Authorization: Bearer` to the Hub endpoint only, never to a mirror, the Hub's CDN or any
  other host (for gated or private datasets).
- `HF_HUB_OFFLINE=1`: no network at all; a file neither cached nor in a mirror fails at once.
- `NANOCHAT_DOWNLOAD_RETRIES`, `NANOCHAT_DOWNLOAD_TIMEOUT` (seconds per read).

Downloads land in the cache under the base dir only after they verified (size, parquet footer, gzip stream, JSON
lines), via a temp file and an atomic rename; partial downloads resume with HTTP Range; 5xx, resets and stalls are
retried with backoff; a file lock makes concurrent ranks download once.
"""

import gzip
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
from filelock import FileLock

from nanochat.common import UserError, get_base_dir

CHUNK = 1 << 20


class DownloadError(UserError):
    """A file could not be fetched or did not verify; the message is one line that says how to fix it."""


def _retries() -> int:
    return max(1, int(os.environ.get("NANOCHAT_DOWNLOAD_RETRIES", "5")))


def _timeout() -> float:
    return float(os.environ.get("NANOCHAT_DOWNLOAD_TIMEOUT", "30"))


def _mirror() -> str:
    return os.environ.get("NANOCHAT_MIRROR", "").rstrip("/")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def _hub_endpoint() -> str:
    # NANOCHAT_HF_ENDPOINT: the name this setting had before HF_ENDPOINT was honoured
    endpoint = os.environ.get("HF_ENDPOINT") or os.environ.get("NANOCHAT_HF_ENDPOINT") or "https://huggingface.co"
    return endpoint.rstrip("/")


def offline() -> bool:
    """True when the real sources are replaced by a mirror (NANOCHAT_MIRROR) or the Hub is off (HF_HUB_OFFLINE=1):
    callers then use their offline stand-ins for what the mirror lacks."""
    return bool(_mirror()) or _hub_offline()


def has(repo: str, path: str) -> bool:
    """Whether a Hugging Face dataset file can be had without asking the network: cached already, or in a local
    mirror. Online without a mirror every file is assumed to exist (a missing one fails with its own message)."""
    rel = f"hf/datasets/{repo}/{path}"
    if (get_base_dir() / rel).exists():
        return True
    mirror = _mirror()
    if not mirror:
        return not offline()
    if mirror.startswith(("http://", "https://")):
        return False
    return (Path(mirror) / rel).exists()


def external_file_if_available(mirror_path: str) -> Path | None:
    """A mirror-only file (no online home, e.g. the offline stand-ins' data) when the mirror has it, else None."""
    mirror = _mirror()
    if not mirror or mirror.startswith(("http://", "https://")) or not (Path(mirror) / "files" / mirror_path).exists():
        return None
    return external_file(mirror_path, "")


def hf_file(repo: str, path: str) -> Path:
    """A file of a Hugging Face dataset repo, cached at <base>/hf/datasets/<repo>/<path>."""
    rel = f"hf/datasets/{repo}/{path}"
    token = os.environ.get("HF_TOKEN", "").strip()
    return _fetch(rel, f"{_hub_endpoint()}/datasets/{repo}/resolve/main/{path}", token)


def external_file(mirror_path: str, url: str) -> Path:
    """A file from elsewhere on the web (eval bundle, word list), cached at <base>/files/<mirror_path>."""
    return _fetch(f"files/{mirror_path}", url)


def zip_member(archive: str, url: str, member: str) -> Path:
    """A file of a zip on the web whose members sit under `<archive>/` (the eval bundle): <base>/<archive>/<member>,
    the zip fetched once (as files/<archive>.zip) and extracted. A mirror holds the zip unpacked, so there the
    member alone is fetched, from files/<archive>/<member>."""
    if _mirror():
        return external_file(f"{archive}/{member}", url)
    path = get_base_dir() / archive / member
    if not path.exists():
        with zipfile.ZipFile(external_file(f"{archive}.zip", url)) as z:
            z.extractall(get_base_dir())
    if not path.exists():
        raise DownloadError(f"{archive}/{member} is not in {url}")
    return path


def _fetch(rel: str, url: str, token: str = "") -> Path:
    """The cached file at <base>/<rel>: copied from the mirror, fetched from the mirror's URL, or fetched from
    `url` (with `token` as bearer, only there)."""
    dest = get_base_dir() / rel
    if dest.exists():
        return dest
    mirror = _mirror()
    if not mirror and _hub_offline():
        raise DownloadError(f"{rel} is not cached and HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE, "
                            "or set NANOCHAT_MIRROR=/path/to/mirror to read a local copy")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if dest.exists():  # another rank finished it while we waited for the lock
            return dest
        if mirror and not mirror.startswith(("http://", "https://")):
            _copy_local(Path(mirror) / rel, dest)
        elif mirror:
            _download(f"{mirror}/{rel}", dest, rel)
        else:
            _download(url, dest, rel, token)
    return dest


def _copy_local(src: Path, dest: Path) -> None:
    if not src.exists():
        raise DownloadError(f"{src} is not in the mirror (NANOCHAT_MIRROR={_mirror()}): point NANOCHAT_MIRROR at a "
                            "mirror that has it, or unset it to download from the internet")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(src, tmp)
    _verify_or_discard(tmp, str(src), expected_size=src.stat().st_size)
    os.replace(tmp, dest)


def _download(url: str, dest: Path, rel: str, token: str = "") -> None:
    part = dest.with_name(dest.name + ".part")
    last_error = ""
    for attempt in range(_retries()):
        if attempt:
            time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)))
        try:
            expected = _download_once(url, part, token)
        except urllib.error.HTTPError as e:
            if e.code in (404, 401, 403):
                raise DownloadError(_missing_message(rel, url, f"HTTP {e.code}")) from None
            last_error = f"HTTP {e.code}"
            continue
        except (urllib.error.URLError, OSError, TimeoutError, _Truncated) as e:
            last_error = str(getattr(e, "reason", e)) or type(e).__name__
            continue
        try:
            _verify_or_discard(part, url, expected)
        except DownloadError as e:
            last_error = str(e)
            continue
        os.replace(part, dest)
        return
    part.unlink(missing_ok=True)
    raise DownloadError(_missing_message(rel, url, last_error))


def _missing_message(rel: str, url: str, why: str) -> str:
    hint = ("check that the mirror has it" if _mirror() else
            "check the network, or set NANOCHAT_MIRROR=/path/to/mirror to read a local copy")
    return f"could not download {rel} from {url} ({why}): {hint}"


class _Truncated(OSError):
    pass


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Follows redirects, carrying the Authorization header only while they stay on the same scheme and host
    (urllib would forward it anywhere; the Hub redirects file downloads to its CDN, which must not see the token)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth and urlsplit(newurl)[:2] == urlsplit(req.full_url)[:2]:
            new.add_unredirected_header("Authorization", auth)
        return new


def _download_once(url: str, part: Path, token: str = "") -> int | None:
    """Fetch url into part, resuming from its current size; returns the expected total size when known."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "nanochat"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(_SameHostAuth)
    with opener.open(request, timeout=_timeout()) as response:
        if have and response.status != 206:  # the server ignored the Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        name = url.rsplit("/", 1)[-1]
        start, shown = time.time(), time.time()
        with open(part, "ab" if have else "wb") as f:
            got = have
            while chunk := response.read(CHUNK):
                f.write(chunk)
                got += len(chunk)
                if time.time() - shown > 2.0:
                    shown = time.time()
                    rate = (got - have) / max(1e-9, shown - start) / 1e6
                    total = f"/{expected / 1e6:.0f}" if expected else ""
                    print(f"  {name}: {got / 1e6:.0f}{total} MB ({rate:.1f} MB/s)", file=sys.stderr, flush=True)
    if expected is not None and got < expected:
        raise _Truncated(f"connection closed after {got} of {expected} bytes")
    return expected


def _verify_or_discard(path: Path, source: str, expected_size: int | None) -> None:
    """Raise DownloadError (and delete the file) unless it has the right size and its format parses."""
    try:
        size = path.stat().st_size
        if expected_size is not None and size != expected_size:
            raise ValueError(f"size {size} != expected {expected_size}")
        name = path.name.removesuffix(".part").removesuffix(".tmp")
        if name.endswith(".parquet"):
            pq.ParquetFile(path).metadata  # reads the footer
        elif name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                while f.read(CHUNK):
                    pass
        elif name.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        json.loads(line)
        elif name.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                json.load(f)
        elif name.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                if z.testzip() is not None:
                    raise ValueError("corrupt zip member")
    except Exception as e:  # anything unparsable is a bad download, never a cache entry
        path.unlink(missing_ok=True)
        raise DownloadError(f"{source} did not verify ({type(e).__name__}: {str(e)[:120]}); it was discarded")
