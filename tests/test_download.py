"""Tests for covidlib.download: registry, resolve, resumable HTTPS, safe extraction. No network:
a local http.server on 127.0.0.1 and archives built in tmp_path."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import sys
import tarfile
import threading
import time
import types
import warnings
import zipfile
from pathlib import Path

import pytest

from covidlib import download
from covidlib.download import (
    REGISTRY,
    DownloadError,
    UnknownDatasetError,
    UnsafeArchiveError,
    download_https,
    get_info,
    resolve,
    safe_extract,
)

FAKE_KEY = "0123456789abcdef0123456789abcdef"


# ---- registry ---------------------------------------------------------------------------------

def test_registry_short_names_and_handles():
    expected = {
        "aicov-ct-train": "ironman3537/train-no-enhanced",
        "aicov-ct-val": "ironman3537/val-no-enhanced",
        "aicov-ct-test": "ironman3537/test-no-enhanced",
        "aicov-ct-train-enhanced": "ironman3537/train-images-enhanced",
        "aicov-ct-val-test-enhanced": "ironman3537/val-test-images",
        "omicron-delta-ct": "mohammadamireshraghi/covid19-omicron-and-delta-variant-ct-scan-dataset",
        "omicron-delta-xray": "mohammadamireshraghi/covid19-xray-local-data",
        "covidx-ct": "hgunraj/covidxct",
        "covid-radiography": "tawsifurrahman/covid19-radiography-database",
        "sarscov2-ct": "plameneduardo/sarscov2-ctscan-dataset",
    }
    for short, handle in expected.items():
        assert REGISTRY[short].handle == handle
        assert get_info(short) is REGISTRY[short]
        assert get_info(handle) is REGISTRY[short]
        assert get_info(handle.upper()) is REGISTRY[short]
        assert get_info(f"https://www.kaggle.com/datasets/{handle}") is REGISTRY[short]
    assert {"ucsd-covid-ct", "mosmeddata"} <= set(REGISTRY)
    od = REGISTRY["omicron-delta-ct"]
    assert od.expected_counts == {"positive": 12231, "negative": 2251} and od.expected_total == 14482
    assert REGISTRY["omicron-delta-xray"].expected_total == 341
    assert REGISTRY["sarscov2-ct"].expected_counts == {"COVID": 1252, "non-COVID": 1230}
    for e in REGISTRY.values():
        assert e.kind in ("kaggle", "https", "github")
        assert e.modality in ("ct", "xray")
        assert set(e.label_map) == set(e.classes)
        assert all(v is None or v in ("covid", "cap", "normal", "non_covid") for v in e.label_map.values())
        if e.expected_counts:
            assert sum(e.expected_counts.values()) == e.expected_total
    assert "| `sarscov2-ct` |" in download.registry_table()


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(UnknownDatasetError) as ei:
        resolve("no-such-dataset")
    msg = str(ei.value)
    assert "sarscov2-ct" in msg and "covidx-ct" in msg and "hgunraj/covidxct" in msg
    with pytest.raises(UnknownDatasetError):
        resolve("kaggle:not a handle")


# ---- resolve -------------------------------------------------------------------------------------

def test_local_path_is_returned_as_is(tmp_path):
    (tmp_path / "x.png").write_bytes(b"x")
    assert resolve(tmp_path) == tmp_path
    assert resolve(str(tmp_path / "x.png")) == tmp_path / "x.png"


def test_fake_downloader_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDLIB_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(download, "KAGGLE_INPUT_ROOT", tmp_path / "no-kaggle")
    calls = []

    def fake(info, dest):
        calls.append((info.name, dest))
        (dest / "COVID").mkdir(parents=True)
        (dest / "COVID" / "a.png").write_bytes(b"png")
        return dest

    got = resolve("plameneduardo/sarscov2-ctscan-dataset", downloader=fake)
    assert got == tmp_path / "data" / "sarscov2-ct"
    assert (got / "COVID" / "a.png").is_file()
    assert calls == [("sarscov2-ct", got)]
    # Already there: reused, no second download.
    assert resolve("sarscov2-ct", downloader=fake) == got
    assert len(calls) == 1
    # Explicit dest and unregistered kaggle: handles.
    other = resolve("kaggle:someone/some-set", dest=tmp_path / "custom", downloader=fake)
    assert other == tmp_path / "custom" and calls[-1][0] == "some-set"


def test_kaggle_kernel_prefers_attached_input(tmp_path, monkeypatch):
    root = tmp_path / "kaggle" / "input"
    (root / "covidxct").mkdir(parents=True)
    monkeypatch.setattr(download, "KAGGLE_INPUT_ROOT", root)

    def must_not_download(info, dest):  # pragma: no cover - failing path
        raise AssertionError("downloaded although the data set is attached")

    assert resolve("covidx-ct", downloader=must_not_download) == root / "covidxct"
    # Not attached: falls through to the downloader.
    monkeypatch.setenv("COVIDLIB_DATA", str(tmp_path / "data"))
    got = resolve("sarscov2-ct", downloader=lambda info, dest: (dest.mkdir(), (dest / "f").write_text("x"), dest)[-1])
    assert got == tmp_path / "data" / "sarscov2-ct"


def test_manual_dataset_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDLIB_DATA", str(tmp_path))
    with pytest.raises(DownloadError, match="mosmed.ai"):
        resolve("mosmeddata")


def test_missing_kagglehub_message(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDLIB_DATA", str(tmp_path))
    monkeypatch.setattr(download, "KAGGLE_INPUT_ROOT", tmp_path / "none")
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # import fails
    with pytest.raises(DownloadError) as ei:
        resolve("sarscov2-ct")
    msg = str(ei.value)
    assert "pip install" in msg and "kagglehub" in msg
    assert "https://www.kaggle.com/datasets/plameneduardo/sarscov2-ctscan-dataset" in msg
    assert not (tmp_path / "sarscov2-ct").exists()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused at once
    return port


def test_offline_kaggle_message_has_no_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDLIB_DATA", str(tmp_path))
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", FAKE_KEY)
    monkeypatch.setattr(download, "KAGGLE_INPUT_ROOT", tmp_path / "none")
    fake = types.ModuleType("kagglehub")
    fake.dataset_download = lambda handle, **kw: (_ for _ in ()).throw(AssertionError("should not be called"))
    monkeypatch.setitem(sys.modules, "kagglehub", fake)
    monkeypatch.setattr(download, "_KAGGLE_PROBE", ("127.0.0.1", _closed_port()))
    with pytest.raises(DownloadError) as ei:
        resolve("covidx-ct")
    msg = str(ei.value)
    assert "cannot reach" in msg and "by hand" in msg
    assert FAKE_KEY not in msg and FAKE_KEY not in repr(ei.value)


def test_kagglehub_error_is_wrapped_and_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDLIB_DATA", str(tmp_path))
    monkeypatch.setenv("KAGGLE_KEY", FAKE_KEY)
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle-config"))
    monkeypatch.setattr(download, "KAGGLE_INPUT_ROOT", tmp_path / "none")
    monkeypatch.setattr(download, "_reachable", lambda host, port, timeout=10.0: True)

    def failing(handle, output_dir=None):
        raise PermissionError(f"401 Unauthorized for {handle} with key={FAKE_KEY}")

    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=failing))
    with pytest.raises(DownloadError) as ei:
        resolve("sarscov2-ct")
    msg = str(ei.value)
    assert "401" in msg and "***" in msg
    assert "KAGGLE_USERNAME" in msg and "kaggle.json" in msg  # no credentials found: says how
    assert FAKE_KEY not in msg
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


def test_kagglehub_success_moves_into_dest(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDLIB_DATA", str(tmp_path))
    monkeypatch.setattr(download, "KAGGLE_INPUT_ROOT", tmp_path / "none")
    monkeypatch.setattr(download, "_reachable", lambda host, port, timeout=10.0: True)

    def ok(handle, output_dir=None):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "img.png").write_bytes(b"x")
        return output_dir

    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=ok))
    got = resolve("omicron-delta-xray")
    assert got == tmp_path / "omicron-delta-xray" and (got / "img.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["omicron-delta-xray"]


# ---- HTTPS download ----------------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    data = PAYLOAD
    honour_range = True
    requests: list = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.headers.get("Range"))
        if self.path.endswith("/missing"):
            self.send_error(404)
            return
        if self.path.endswith("/drip"):  # promise 1000 bytes, send one every 0.2 s (50 at most)
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self._drip(b"x" * 50)
            return
        if self.path.endswith("/drip-headers"):  # even the status line comes a byte at a time
            self.close_connection = True
            self._drip(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Slow: " + b"y" * 45)
            return
        if self.path.endswith("/drop"):  # promise everything, send half, hang up
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.data)))
            self.end_headers()
            self.wfile.write(self.data[: len(self.data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        body, status = self.data, 200
        rng = self.headers.get("Range")
        headers = {}
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(self.data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(self.data)}")
                self.end_headers()
                return
            body, status = self.data[start:], 206
            headers["Content-Range"] = f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, data: bytes) -> None:
        for i in range(len(data)):  # bounded: stops by itself after 10 s, or when the client left
            try:
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.2)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    _Handler.requests = []
    _Handler.honour_range = True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_part_file(server, tmp_path):
    dest = tmp_path / "d" / "file.bin"
    dest.parent.mkdir()
    part = dest.with_name("file.bin.part")
    part.write_bytes(PAYLOAD[:300_000])
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    seen = []
    got = download_https(f"{server}/file.bin", dest, sha256=sha, progress=lambda d, t: seen.append((d, t)))
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert not part.exists()
    assert _Handler.requests == ["bytes=300000-"]
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    # Already complete: no new request.
    assert download_https(f"{server}/file.bin", dest, sha256=sha) == dest
    assert len(_Handler.requests) == 1


def test_interrupted_download_keeps_part_then_resumes(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="resume"):
        download_https(f"{server}/drop", dest, timeout=5)
    part = dest.with_name("file.bin.part")
    assert not dest.exists() and part.stat().st_size == len(PAYLOAD) // 2
    download_https(f"{server}/file.bin", dest, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD
    assert _Handler.requests[-1] == f"bytes={len(PAYLOAD) // 2}-"


def test_download_server_without_range_restarts(server, tmp_path):
    _Handler.honour_range = False
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(b"garbage that is not the start")
    download_https(f"{server}/file.bin", dest)
    assert dest.read_bytes() == PAYLOAD


def test_download_complete_part_416(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(PAYLOAD)
    download_https(f"{server}/file.bin", dest, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD


def test_download_checksum_mismatch(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_https(f"{server}/file.bin", dest, sha256="0" * 64)
    assert not dest.exists()
    assert not dest.with_name("file.bin.part").exists()


def test_download_http_error_and_offline(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_https(f"{server}/missing", tmp_path / "m.bin")
    url = f"http://user:{FAKE_KEY}@127.0.0.1:{_closed_port()}/x.zip?token={FAKE_KEY}"
    with pytest.raises(DownloadError) as ei:
        download_https(url, tmp_path / "x.zip", timeout=5)
    msg = str(ei.value)
    assert "cannot download" in msg and "connection" in msg
    assert FAKE_KEY not in msg
    assert not (tmp_path / "x.zip").exists()
    with pytest.raises(ValueError):
        download_https("file:///etc/passwd", tmp_path / "p")


def test_dripping_server_hits_the_total_deadline(server, tmp_path):
    # One byte every 0.2 s never trips the 3 s idle timeout: the deadline stops it.
    # The drip lasts 10 s (50 bytes): the deadline, not the drip's end or the idle timeout,
    # stopped it, whatever the machine's load (no wall-clock assertion).
    dest = tmp_path / "slow.bin"
    with pytest.raises(DownloadError, match=r"total deadline of 1\.5 s passed \(deadline\)"):
        download_https(f"{server}/drip", dest, timeout=3, deadline=1.5, min_rate=None)
    assert not dest.exists() and 1 <= dest.with_name("slow.bin.part").stat().st_size < 50  # resumable


def test_dripping_headers_hit_the_total_deadline(server, tmp_path):
    with pytest.raises(DownloadError, match=r"deadline of 1 s passed \(deadline\)"):
        download_https(f"{server}/drip-headers", tmp_path / "h.bin", timeout=3, deadline=1)


def test_dripping_server_is_below_the_minimum_rate(server, tmp_path):
    with pytest.raises(DownloadError, match=r"below the minimum rate of 1,000 bytes/s \(min_rate\)"):
        download_https(f"{server}/drip", tmp_path / "slow.bin", timeout=3, deadline=None,
                       min_rate=1000, rate_grace=0.5)
    assert (tmp_path / "slow.bin.part").stat().st_size < 50  # stopped before the drip's end
    # A fast server passes the same limits.
    got = download_https(f"{server}/file.bin", tmp_path / "fast.bin", timeout=3, deadline=30,
                         min_rate=1000, rate_grace=0.0)
    assert got.read_bytes() == PAYLOAD


def test_https_dataset_with_inner_archives(server, tmp_path, monkeypatch):
    # A GitHub-style archive holding a zip inside, served by the local server.
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("CT_COVID/a.png", b"a")
        z.writestr("CT_COVID/b.png", b"b")
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w") as z:
        z.writestr("Repo-master/README.md", b"readme")
        z.writestr("Repo-master/Images/CT_COVID.zip", inner.getvalue())
    monkeypatch.setattr(_Handler, "data", outer.getvalue())
    info = download.DatasetInfo(
        name="fake-gh", title="fake", kind="github", handle=f"{server}/master.zip", licence=None,
        classes=("CT_COVID",), label_map={"CT_COVID": "covid"}, modality="ct", expected_counts=None,
        expected_total=None, citation="", notes="", page=server,
        sha256=hashlib.sha256(outer.getvalue()).hexdigest(),
        archives_inside=("Repo-master/Images/CT_COVID.zip",),
    )
    dest = tmp_path / "fake-gh"
    got = download._https_dataset_download(info, dest)
    assert got == dest
    assert (dest / "Repo-master/Images/CT_COVID/CT_COVID/a.png").read_bytes() == b"a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-gh"]  # no leftovers


# ---- safe extraction -----------------------------------------------------------------------------

def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                t.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                t.addfile(info, io.BytesIO(m[1]))
    return path


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_extract_zip_and_tar(tmp_path):
    z = _zip(tmp_path / "a.zip", {"data/COVID/1.png": b"1", "data/Normal/2.png": b"22", "data/empty/": b""})
    out = safe_extract(z, tmp_path / "out_zip")
    assert (out / "data/COVID/1.png").read_bytes() == b"1"
    assert (out / "data/empty").is_dir()
    t = _tar(tmp_path / "a.tar.gz", [("./data/COVID/1.png", b"1"), ("data/Normal/2.png", b"22")])
    out = safe_extract(t, tmp_path / "out_tar")
    assert (out / "data/Normal/2.png").read_bytes() == b"22"
    # An existing empty folder is fine, a non-empty one is refused.
    (tmp_path / "empty").mkdir()
    safe_extract(z, tmp_path / "empty")
    with pytest.raises(FileExistsError):
        safe_extract(z, tmp_path / "out_zip")


@pytest.mark.parametrize("name", ["/etc/evil.txt", "../evil.txt", "data/../../evil.txt", "C:/evil.txt",
                                  "data\\..\\..\\evil.txt"])
def test_zip_path_escapes_rejected(tmp_path, name):
    z = _zip(tmp_path / "bad.zip", {"ok.txt": b"ok", name: b"evil"})
    before = _listing(tmp_path)
    with pytest.raises(UnsafeArchiveError):
        safe_extract(z, tmp_path / "out")
    assert _listing(tmp_path) == before  # nothing written anywhere, no temp folder left


@pytest.mark.parametrize("name", ["/tmp/evil.txt", "../evil.txt", "a/../../evil.txt"])
def test_tar_path_escapes_rejected(tmp_path, name):
    t = _tar(tmp_path / "bad.tar.gz", [("ok.txt", b"ok"), (name, b"evil")])
    before = _listing(tmp_path)
    with pytest.raises(UnsafeArchiveError):
        safe_extract(t, tmp_path / "out")
    assert _listing(tmp_path) == before


def test_tar_links_and_devices_rejected(tmp_path):
    sym = tarfile.TarInfo("data/link")
    sym.type, sym.linkname = tarfile.SYMTYPE, "../../outside"
    hard = tarfile.TarInfo("data/hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/passwd"
    dev = tarfile.TarInfo("data/dev")
    dev.type = tarfile.CHRTYPE
    fifo = tarfile.TarInfo("data/fifo")
    fifo.type = tarfile.FIFOTYPE
    for i, m in enumerate((sym, hard, dev, fifo)):
        t = _tar(tmp_path / f"bad{i}.tar.gz", [("data/ok.txt", b"ok"), m])
        with pytest.raises(UnsafeArchiveError):
            safe_extract(t, tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()
    assert not (tmp_path / "outside").exists()


def test_zip_symlink_rejected(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as z:
        info = zipfile.ZipInfo("data/link")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "../../outside")
    with pytest.raises(UnsafeArchiveError, match="link"):
        safe_extract(path, tmp_path / "out")


def test_size_bomb_rejected(tmp_path):
    z = _zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * 5_000_000})
    assert z.stat().st_size < 100_000  # compresses ~1000:1
    with pytest.raises(UnsafeArchiveError, match="more than"):
        safe_extract(z, tmp_path / "out", max_bytes=1_000_000)
    assert not (tmp_path / "out").exists()
    t = _tar(tmp_path / "bomb.tar.gz", [(f"f{i}", b"x") for i in range(20)])
    with pytest.raises(UnsafeArchiveError, match="members"):
        safe_extract(t, tmp_path / "out2", max_files=10)


def test_lying_declared_size_is_caught_by_actual_bytes(tmp_path, monkeypatch):
    # Declared sizes pass the first check; the bytes actually written still hit the cap.
    z = _zip(tmp_path / "lie.zip", {"a.bin": b"\1" * 400_000, "b.bin": b"\2" * 400_000})
    real = download._zip_members

    def lying(zf):
        for name, kind, size, ref in real(zf):
            yield name, kind, 1, ref

    monkeypatch.setattr(download, "_zip_members", lying)
    with pytest.raises(UnsafeArchiveError, match="actual data"):
        safe_extract(z, tmp_path / "out", max_bytes=500_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lie.zip"]


def test_not_an_archive(tmp_path):
    p = tmp_path / "page.zip"
    p.write_bytes(b"<html>login required</html>")
    with pytest.raises(DownloadError, match="not a zip or tar"):
        safe_extract(p, tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        safe_extract(tmp_path / "nope.zip", tmp_path / "out")


def test_module_import_is_light():
    code = "import sys, covidlib.download; sys.exit(int('keras' in sys.modules or 'tensorflow' in sys.modules))"
    assert os.system(f'"{sys.executable}" -c "{code}"') == 0


# ---- archive bombs, free space, names ----------------------------------------------------------

def test_compression_ratio_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "RATIO_FLOOR", 1_000_000)  # so a 5 MB bomb is enough
    z = _zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * 5_000_000})  # ~1000:1
    with pytest.raises(UnsafeArchiveError, match=r"expands [\d,]+x .* 200x compression-ratio limit"):
        safe_extract(z, tmp_path / "out")
    # Whole-archive ratio: many members, none alone above the floor.
    z = _zip(tmp_path / "many.zip", {f"z{i}.bin": b"\0" * 400_000 for i in range(5)})
    with pytest.raises(UnsafeArchiveError, match=r"would expand [\d,]+x .* compression-ratio limit"):
        safe_extract(z, tmp_path / "out")
    # One bomb member hidden among incompressible ones: the per-member ratio catches it.
    z = _zip(tmp_path / "mixed.zip", {"noise.bin": os.urandom(3_000_000), "zeros.bin": b"\0" * 2_000_000})
    with pytest.raises(UnsafeArchiveError, match=r"member 'zeros.bin' expands"):
        safe_extract(z, tmp_path / "out")
    t = _tar(tmp_path / "bomb.tar.gz", [("zeros.bin", b"\0" * 5_000_000)])
    with pytest.raises(UnsafeArchiveError, match="compression-ratio limit"):
        safe_extract(t, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.tar.gz", "bomb.zip", "many.zip", "mixed.zip"]
    # Small, very compressible archives (text, masks) stay below the floor; max_ratio=None lifts it.
    assert (safe_extract(z, tmp_path / "ok", max_ratio=None) / "zeros.bin").stat().st_size == 2_000_000
    monkeypatch.setattr(download, "RATIO_FLOOR", 64 * 1024**2)
    assert (safe_extract(tmp_path / "bomb.zip", tmp_path / "ok2") / "zeros.bin").is_file()


def test_ratio_limit_on_actual_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "RATIO_FLOOR", 1_000_000)
    z = _zip(tmp_path / "lie.zip", {"a.bin": b"\0" * 3_000_000})
    real = download._zip_members

    def lying(zf):  # claims one byte, so only the bytes written can tell
        for name, kind, size, ref in real(zf):
            yield name, kind, 1, types.SimpleNamespace()

    monkeypatch.setattr(download, "_zip_members", lying)
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, ref: io.BytesIO(b"\0" * 3_000_000))
    with pytest.raises(UnsafeArchiveError, match=r"actual data.*compression-ratio limit"):
        safe_extract(z, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lie.zip"]


def test_default_size_cap_is_the_free_space(tmp_path, monkeypatch):
    z = _zip(tmp_path / "a.zip", {"noise.bin": os.urandom(3_000_000)})
    usage = types.SimpleNamespace(total=10**12, used=0, free=download.FREE_SPACE_MARGIN + 1_000_000)
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(UnsafeArchiveError, match=r"more than 1,000,000 bytes .*the free space of"):
        safe_extract(z, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert (safe_extract(z, tmp_path / "out", max_bytes=5_000_000) / "noise.bin").is_file()


def _zip_entries(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name we want
        with zipfile.ZipFile(path, "w") as z:
            for name, data in entries:
                z.writestr(name, data)
    return path


@pytest.mark.parametrize("entries, message", [
    ([("data/a.png", b"1"), ("data/a.png", b"2")], "appears twice"),
    ([("data/./a.png", b"1"), ("data//a.png", b"2")], "appears twice"),
    ([("data/a", b"1"), ("data/a/b.png", b"2")], "needs 'data/a' to be a folder"),
    ([("data/a/", b""), ("data/a", b"1")], "is a file, but earlier members make it a folder"),
    ([("data/a/b.png", b"1"), ("data/a", b"1")], "is a file, but earlier members make it a folder"),
    ([("data/a", b"1"), ("data/a/", b"")], "is a folder, but an earlier member is a file"),
    ([("d/" + "x" * 256 + ".png", b"1")], "name component of 260 bytes; file systems allow 255"),
    ([("d/" + "é" * 127 + ".png", b"1")], "name component of 258 bytes"),
    ([("/".join(["y" * 200] * 21), b"1")], "would make a path of .* bytes; the system allows 4096"),
])
def test_clashing_and_overlong_names_are_refused(tmp_path, entries, message):
    z = _zip_entries(tmp_path / "bad.zip", entries)
    with pytest.raises(UnsafeArchiveError, match=message):
        safe_extract(z, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_tar_duplicates_and_file_then_folder_are_refused(tmp_path):
    t = _tar(tmp_path / "dup.tar.gz", [("a.txt", b"1"), ("./a.txt", b"2")])
    with pytest.raises(UnsafeArchiveError, match="appears twice"):
        safe_extract(t, tmp_path / "out")
    t = _tar(tmp_path / "clash.tar.gz", [("a", b"1"), ("a/b.txt", b"2")])
    with pytest.raises(UnsafeArchiveError, match="needs 'a' to be a folder"):
        safe_extract(t, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_write_failure_is_one_clear_error(tmp_path, monkeypatch):
    z = _zip(tmp_path / "a.zip", {"data/a.png": b"1"})
    real_open = open

    def full_disk(path, mode="r", *args, **kw):
        if "x" in mode:
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(DownloadError, match=r"cannot write member 'data/a.png': No space left on device"):
        safe_extract(z, tmp_path / "out")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]
