"""Downloads from a local HTTP server on 127.0.0.1: good, wrong and half-sent files.

No complete-looking file may ever appear under the real name unless its checksum matched.
Also the data-dir resolution order and ``fetch_dataset``/``verify_dataset`` end to end.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vaelab.data import (
    FILES,
    DownloadError,
    download_file,
    fetch_dataset,
    load_dataset,
    resolve_data_dir,
    user_cache_dir,
    verify_dataset,
)
from vaelab.data import frey as frey_mod

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()
FREY = Path(__file__).resolve().parents[2] / "shared" / "data" / "frey-face" / "frey_rawface.mat"


class Handler(BaseHTTPRequestHandler):
    routes: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.routes.get(self.path)
        if self.path.startswith("/drop/"):
            body = self.routes[self.path[len("/drop") :]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # then hang up
            self.wfile.flush()
            self.close_connection = True
            return
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server():
    Handler.routes = {"/good": PAYLOAD, "/wrong": PAYLOAD[::-1]}
    if FREY.is_file():
        Handler.routes["/frey_rawface.mat"] = FREY.read_bytes()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def online(monkeypatch):
    monkeypatch.delenv("VAELAB_OFFLINE", raising=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_download_is_verified_and_renamed(server, tmp_path):
    dest = tmp_path / "sub" / "file.bin"
    assert download_file(f"{server}/good", dest, SHA, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD and leftovers(dest.parent) == ["file.bin"]
    dest.unlink()
    download_file(f"{server}/good", dest, f"md5:{MD5}", size=len(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_wrong_file_is_rejected_and_removed(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError) as err:
        download_file(f"{server}/wrong", dest, SHA, progress=False)
    msg = str(err.value)
    assert "file.bin" in msg and SHA in msg and str(dest) in msg and "/wrong" in msg
    assert leftovers(tmp_path) == []


def test_dropped_connection_leaves_no_file(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="closed after 524288 of 1048576 bytes"):
        download_file(f"{server}/drop/good", dest, SHA, progress=False)
    assert leftovers(tmp_path) == []
    with pytest.raises(DownloadError):  # even without a checksum, a short transfer fails
        download_file(f"{server}/drop/good", dest, None, progress=False)
    assert leftovers(tmp_path) == []


def test_mirrors_are_tried_in_order(server, tmp_path):
    dest = tmp_path / "file.bin"
    urls = [f"{server}/missing", f"{server}/drop/good", f"{server}/wrong", f"{server}/good"]
    download_file(urls, dest, SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD and leftovers(tmp_path) == ["file.bin"]


def test_no_network_gives_a_clear_error(tmp_path, monkeypatch):
    dest = tmp_path / "file.bin"
    # Port 9 on 127.0.0.1 ("discard") is closed here: connection refused, no real network.
    with pytest.raises(DownloadError, match=r"could not download file\.bin") as err:
        download_file("http://127.0.0.1:9/file.bin", dest, SHA, progress=False, timeout=5)
    assert SHA in str(err.value) and leftovers(tmp_path) == []
    monkeypatch.setenv("VAELAB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="VAELAB_OFFLINE"):
        download_file("http://127.0.0.1:9/file.bin", dest, SHA, progress=False)


@pytest.mark.skipif(not FREY.is_file(), reason=f"{FREY} not found")
def test_fetch_verify_and_load_through_the_registry(server, tmp_path, monkeypatch):
    spec = frey_mod.FREY_FILES.groups[0][0]
    served = replace(
        frey_mod.FREY_FILES,
        groups=(
            (
                replace(
                    spec, urls=(f"{server}/drop/frey_rawface.mat", f"{server}/frey_rawface.mat")
                ),
            ),
        ),
    )
    monkeypatch.setattr(frey_mod, "FREY_FILES", served)
    monkeypatch.setitem(FILES, "frey-face", served)
    assert verify_dataset("frey-face", tmp_path)[0]["present"] is False
    paths = fetch_dataset("frey-face", tmp_path, progress=False)
    assert paths == [tmp_path / "frey-face" / "frey_rawface.mat"]
    assert leftovers(tmp_path / "frey-face") == ["frey_rawface.mat"]
    row = verify_dataset("frey-face", tmp_path)[0]
    assert row["present"] and row["verified"] is True and row["size"] == 1100584
    assert len(load_dataset("frey-face", tmp_path).train) == 1765


def test_load_downloads_what_is_missing(server, tmp_path, monkeypatch):
    spec = replace(frey_mod.FREY_FILES.groups[0][0], urls=(f"{server}/wrong",))
    served = replace(frey_mod.FREY_FILES, groups=((spec,),))
    monkeypatch.setattr(frey_mod, "FREY_FILES", served)
    with pytest.raises(DownloadError, match="5aeb024d42b8a6091f30e5eb18c8a48d|265a83a2"):
        load_dataset("frey-face", tmp_path)
    assert leftovers(tmp_path / "frey-face") == []


def test_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("VAELAB_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == user_cache_dir()
    if user_cache_dir().is_relative_to(tmp_path):  # Linux/BSD layout
        assert resolve_data_dir() == tmp_path / "xdg" / "vaelab" / "data"
