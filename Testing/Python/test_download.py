"""basalseg.download against a real HTTP server on 127.0.0.1 (no other network)."""

from __future__ import annotations

import hashlib
import http.server
import json

import pytest
from conftest import local_http_server

from basalseg import download
from basalseg.catalogue import CATALOGUE, ModelEntry, UnknownModelError, get_entry, list_entries
from basalseg.errors import BackendUnavailableError, CheckpointError, DownloadError

BODY = bytes(range(256)) * 1200  # 307,200 bytes
BODY_SHA = hashlib.sha256(BODY).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: dict[str, int] = {}
    payload = {"/model.pt": BODY}

    def log_message(self, *args) -> None:  # keep pytest output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).hits[self.path] = type(self).hits.get(self.path, 0) + 1
        if self.path in self.payload:
            body = self.payload[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/truncated.pt":
            # Announce the whole body, send a third of it, then drop the connection.
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[: len(BODY) // 3])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_error(404, "no such file")


@pytest.fixture(scope="module")
def server():
    with local_http_server(_Handler) as url:
        yield url


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("BASALSEG_CACHE", str(root))
    monkeypatch.delenv("BASALSEG_OFFLINE", raising=False)
    return root


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def test_download_verifies_sha256_and_reports_progress(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "CHUNK_SIZE", 32 * 1024)
    calls: list[tuple[int, int | None]] = []
    dest = tmp_path / "sub" / "model.pt"
    out = download.download_file(f"{server}/model.pt", dest, sha256=BODY_SHA.upper(),
                                 progress=lambda done, total: calls.append((done, total)))
    assert out == dest and dest.read_bytes() == BODY
    assert calls[0] == (0, len(BODY)) and calls[-1] == (len(BODY), len(BODY))
    done = [c[0] for c in calls]
    assert len(calls) >= 10 and all(b > a for a, b in zip(done, done[1:]))
    assert _leftovers(dest.parent) == []


def test_sha256_mismatch_leaves_nothing(server, tmp_path):
    dest = tmp_path / "model.pt"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        download.download_file(f"{server}/model.pt", dest, sha256=wrong)
    message = str(info.value)
    assert wrong in message and BODY_SHA in message and "\n" not in message
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_interrupted_download_leaves_nothing(server, tmp_path):
    dest = tmp_path / "model.pt"
    with pytest.raises(DownloadError, match="interrupted"):
        download.download_file(f"{server}/truncated.pt", dest)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_exception_in_progress_aborts_and_cleans_up(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "CHUNK_SIZE", 32 * 1024)
    dest = tmp_path / "model.pt"

    def cancel(done, total):
        if done > 64 * 1024:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download.download_file(f"{server}/model.pt", dest, progress=cancel)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_http_error_and_bad_arguments(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download.download_file(f"{server}/missing.pt", tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="sha256"):
        download.download_file(f"{server}/model.pt", tmp_path / "x.pt", sha256="abc")
    with pytest.raises(ValueError, match="timeout"):
        download.download_file(f"{server}/model.pt", tmp_path / "x.pt", timeout=0)


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BASALSEG_CACHE", str(tmp_path / "c"))
    assert download.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BASALSEG_CACHE")
    assert download.cache_dir().parts[-2:] == (".cache", "basalseg")


def test_trust_on_first_use_records_and_later_refuses_tampering(server, cache):
    entry = ModelEntry("toy", f"{server}/model.pt", None, "configs/x.yaml", 0.3, "test model")
    path = download.fetch_cached(entry)
    assert path == cache / "model.pt" and path.read_bytes() == BODY
    record = json.loads((cache / "checksums.json").read_text())["files"]["model.pt"]
    assert record["sha256"] == BODY_SHA and record["url"] == entry.url

    hits = _Handler.hits.get("/model.pt", 0)
    assert download.fetch_cached(entry, offline=True) == path  # verified against the record
    assert _Handler.hits.get("/model.pt", 0) == hits  # and not downloaded again

    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        download.fetch_cached(entry)
    assert path.exists()  # refused, not silently replaced


def test_known_sha256_is_enforced_on_download(server, cache):
    entry = ModelEntry("toy", f"{server}/model.pt", "f" * 64, "configs/x.yaml", 0.3, "test model")
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download.fetch_cached(entry)
    assert not (cache / "model.pt").exists() and _leftovers(cache) == []
    good = ModelEntry("toy", f"{server}/model.pt", BODY_SHA, "configs/x.yaml", 0.3, "test model")
    assert download.fetch_cached(good).read_bytes() == BODY
    assert not (cache / "checksums.json").exists()  # published hash: nothing to record


def test_offline_without_cache_is_a_clear_error(server, cache, monkeypatch):
    entry = ModelEntry("toy", f"{server}/model.pt", None, "configs/x.yaml", 0.3, "test model")
    hits = _Handler.hits.get("/model.pt", 0)
    monkeypatch.setenv("BASALSEG_OFFLINE", "1")
    with pytest.raises(BackendUnavailableError) as info:
        download.fetch_cached(entry, offline=False)  # the environment wins
    message = str(info.value)
    assert "offline" in message and entry.url in message and "\n" not in message
    monkeypatch.delenv("BASALSEG_OFFLINE")
    with pytest.raises(BackendUnavailableError, match="offline"):
        download.fetch_cached(entry, offline=True)
    assert _Handler.hits.get("/model.pt", 0) == hits and not (cache / "model.pt").exists()


def test_malformed_checksums_file_is_refused(server, cache):
    cache.mkdir(parents=True)
    (cache / "checksums.json").write_text("{not json")
    entry = ModelEntry("toy", f"{server}/model.pt", None, "configs/x.yaml", 0.3, "test model")
    with pytest.raises(CheckpointError, match="checksums.json"):
        download.fetch_cached(entry)


def test_catalogue_entries():
    names = [e.name for e in list_entries()]
    assert names == ["sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large"]
    tiny = get_entry("sam2.1_hiera_tiny.pt")
    assert tiny.url == "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt"
    assert tiny.config == "configs/sam2.1/sam2.1_hiera_t.yaml" and tiny.filename == "sam2.1_hiera_tiny.pt"
    assert CATALOGUE["sam2.1_hiera_base_plus"].config.endswith("_b+.yaml")
    assert all(e.sha256 is None for e in list_entries())
    with pytest.raises(UnknownModelError) as info:
        get_entry("sam2.1_hiera_huge")
    assert "sam2.1_hiera_tiny" in str(info.value) and isinstance(info.value, KeyError)
