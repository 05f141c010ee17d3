"""Tests of the reference data manifest, the data folder, verification and download.

Downloads go only to an HTTP server on 127.0.0.1 that the `file_server` fixture starts.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stylemodule import data
from stylemodule.data import FileStatus, ManifestEntry
from stylemodule.cli import main
from stylemodule.errors import DataError, DownloadError

REAL_NAMES = [
    "Tuebingen_Neckarfront_gatys_paper_002.jpg",
    "Van_Gogh_Starry_Night_gatys_paper_004.jpg",
    "Van_Gogh_true_target_gatys_paper_021.jpg",
    "Tuebingen_Neckarfront_1024.jpg",
    "Van_Gogh_Starry_Night_970.jpg",
]
RAW = "https://raw.githubusercontent.com"
AUTHORS_IMAGES = f"{RAW}/leongatys/PytorchNeuralStyleTransfer/master/Images"
PAPER_CUTS = f"{RAW}/datamove/style_transfer_reproduce/master"


def shared_data_dir() -> Path:
    """Return the folder of the real images.

    That is STYLEMODULE_DATA if set, else the `shared/data` folder next to the repository.
    """
    if os.environ.get(data.DATA_ENV):
        return Path(os.environ[data.DATA_ENV])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def entry_for(name: str, content: bytes, url: str = "http://127.0.0.1:1/unused") -> ManifestEntry:
    return ManifestEntry(name, url, hashlib.sha256(content).hexdigest(), len(content))


def closed_port() -> int:
    """Return a local port that was just free, so nothing listens on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the real manifest ---


def test_real_manifest_lists_five_images():
    entries = data.read_manifest()

    assert [entry.name for entry in entries] == REAL_NAMES
    urls = {entry.name: entry.url for entry in entries}
    assert urls["Tuebingen_Neckarfront_1024.jpg"] == f"{AUTHORS_IMAGES}/Tuebingen_Neckarfront.jpg"
    assert urls["Van_Gogh_Starry_Night_970.jpg"] == f"{AUTHORS_IMAGES}/vangogh_starry_night.jpg"
    for name in REAL_NAMES[:3]:
        assert urls[name] == f"{PAPER_CUTS}/{name}"


def test_real_manifest_matches_real_files():
    folder = shared_data_dir()
    assert folder.is_dir(), f"no reference images at {folder}; set {data.DATA_ENV}"

    statuses = data.verify(folder, data.read_manifest())

    assert [(status.entry.name, status.state, status.detail) for status in statuses] == [
        (name, "ok", "size and SHA-256 match") for name in REAL_NAMES
    ]


def test_manifest_path_is_project_data_folder():
    assert data.MANIFEST_PATH == Path(__file__).resolve().parents[1] / "data" / "manifest.tsv"


# --- resolve_data_dir ---


def test_resolve_data_dir_option_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "from_env"))

    assert data.resolve_data_dir(str(tmp_path / "from_option")) == tmp_path / "from_option"


def test_resolve_data_dir_env_over_default(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "from_env"))

    assert data.resolve_data_dir() == tmp_path / "from_env"
    assert data.resolve_data_dir("") == tmp_path / "from_env"


def test_resolve_data_dir_default(monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)

    assert data.resolve_data_dir() == data.MANIFEST_PATH.parent


def test_resolve_data_dir_empty_env_falls_back(monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, "")

    assert data.resolve_data_dir() == data.MANIFEST_PATH.parent


def test_resolve_data_dir_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    assert data.resolve_data_dir("relative") == tmp_path / "relative"
    assert data.resolve_data_dir("~/images") == tmp_path / "home" / "images"


# --- read_manifest ---

HEADER = "name\turl\tsha256\tsize"
GOOD_SHA = "0" * 64
GOOD_ROW = f"a.jpg\thttp://127.0.0.1/a.jpg\t{GOOD_SHA}\t10"


def write_manifest(folder: Path, text: str) -> Path:
    path = folder / "manifest.tsv"
    path.write_text(text, encoding="utf-8")
    return path


def row(name="b.jpg", url="https://127.0.0.1/b.jpg", sha256=GOOD_SHA, size="10") -> str:
    return f"{name}\t{url}\t{sha256}\t{size}"


@pytest.mark.parametrize(
    ("bad_row", "problem"),
    [
        pytest.param(f"b.jpg\thttp://127.0.0.1/b.jpg\t{GOOD_SHA}", "expected 4 tab-separated columns", id="3-columns"),
        pytest.param(row() + "\textra", "found 5", id="5-columns"),
        pytest.param(row().replace("\t", " "), "found 1", id="spaces-not-tabs"),
        pytest.param(row(size="0"), "size '0' is not a positive integer", id="size-zero"),
        pytest.param(row(size="-5"), "size '-5' is not a positive integer", id="size-negative"),
        pytest.param(row(size="1.5"), "size '1.5' is not a positive integer", id="size-fraction"),
        pytest.param(row(size="ten"), "size 'ten' is not a positive integer", id="size-word"),
        pytest.param(row(sha256="0" * 63), "is not 64 hexadecimal digits", id="sha-short"),
        pytest.param(row(sha256="0" * 65), "is not 64 hexadecimal digits", id="sha-long"),
        pytest.param(row(sha256="g" * 64), "is not 64 hexadecimal digits", id="sha-not-hex"),
        pytest.param(row(url="ftp://127.0.0.1/b.jpg"), "is not an http or https URL", id="url-ftp"),
        pytest.param(row(url="file:///etc/passwd"), "is not an http or https URL", id="url-file"),
        pytest.param(row(url="example.com/b.jpg"), "is not an http or https URL", id="url-no-scheme"),
        pytest.param(row(url="http:///b.jpg"), "is not an http or https URL", id="url-no-host"),
        pytest.param(row(name="a.jpg"), "duplicate name 'a.jpg', already listed on line 3", id="duplicate"),
        pytest.param(row(name="A.JPG"), "duplicate name 'A.JPG', already listed on line 3", id="duplicate-case"),
        pytest.param(row(name="../evil.jpg"), "name '../evil.jpg' would write outside the data folder", id="parent"),
        pytest.param(row(name=".."), "name '..' would write outside the data folder", id="dot-dot"),
        pytest.param(row(name="/etc/passwd"), "name '/etc/passwd' would write outside", id="absolute"),
        pytest.param(row(name="sub/b.jpg"), "name 'sub/b.jpg' would write outside", id="slash"),
        pytest.param(row(name="sub\\b.jpg"), "would write outside the data folder", id="backslash"),
        pytest.param(row(name="C:evil.jpg"), "name 'C:evil.jpg' would write outside", id="windows-drive"),
        pytest.param(row(name=""), "name is empty", id="empty-name"),
        pytest.param(row(name=".hidden.jpg"), "name '.hidden.jpg' starts with '.'", id="hidden"),
        pytest.param(row(name="b\x1b.jpg"), "contains a control character", id="control-character"),
    ],
)
def test_read_manifest_rejects_bad_row(tmp_path, bad_row, problem):
    path = write_manifest(tmp_path, f"# comment\n{HEADER}\n{GOOD_ROW}\n{bad_row}\n")

    with pytest.raises(DataError) as raised:
        data.read_manifest(path)

    message = str(raised.value)
    assert f"{path} line 4: " in message
    assert problem in message


def test_read_manifest_rejects_wrong_header(tmp_path):
    path = write_manifest(tmp_path, f"# comment\nname\turl\tsize\tsha256\n{GOOD_ROW}\n")

    with pytest.raises(DataError, match="line 2: expected the header"):
        data.read_manifest(path)


def test_read_manifest_rejects_no_entries(tmp_path):
    path = write_manifest(tmp_path, f"# comment\n{HEADER}\n")

    with pytest.raises(DataError, match="lists no files"):
        data.read_manifest(path)


def test_read_manifest_missing_file(tmp_path):
    with pytest.raises(DataError, match="manifest .*absent.tsv not found"):
        data.read_manifest(tmp_path / "absent.tsv")


def test_read_manifest_skips_comments_and_blanks(tmp_path):
    upper_sha = "ABCDEF" + "0" * 58
    text = f"# comment\r\n\r\n{HEADER}\r\n  # indented comment\r\n{row(sha256=upper_sha)}\r\n\r\n"
    path = write_manifest(tmp_path, text)

    entries = data.read_manifest(path)

    assert entries == [ManifestEntry("b.jpg", "https://127.0.0.1/b.jpg", upper_sha.lower(), 10)]


# --- sha256_file, verify and check ---


def test_sha256_file_spans_chunks(tmp_path):
    content = os.urandom(3 * (1 << 20) // 2)
    path = tmp_path / "big.bin"
    path.write_bytes(content)

    assert data.sha256_file(path) == hashlib.sha256(content).hexdigest()


def test_verify_states(tmp_path):
    good = entry_for("good.jpg", b"good content")
    missing = entry_for("missing.jpg", b"missing content")
    short = entry_for("short.jpg", b"twelve bytes")
    changed = entry_for("changed.jpg", b"same length!")
    folder_entry = entry_for("folder.jpg", b"content")
    (tmp_path / "good.jpg").write_bytes(b"good content")
    (tmp_path / "short.jpg").write_bytes(b"eleven byte")
    (tmp_path / "changed.jpg").write_bytes(b"SAME LENGTH!")
    (tmp_path / "folder.jpg").mkdir()

    statuses = data.verify(tmp_path, [good, missing, short, changed, folder_entry])

    states = {status.entry.name: status.state for status in statuses}
    assert states == {
        "good.jpg": "ok",
        "missing.jpg": "missing",
        "short.jpg": "size mismatch",
        "changed.jpg": "sha256 mismatch",
        "folder.jpg": "missing",
    }
    details = {status.entry.name: status.detail for status in statuses}
    assert details["short.jpg"] == "expected 12 bytes, found 11"
    assert hashlib.sha256(b"SAME LENGTH!").hexdigest() in details["changed.jpg"]
    assert statuses[0].path == tmp_path / "good.jpg"


def test_check_lists_each_bad_file(tmp_path):
    good = entry_for("good.jpg", b"good content")
    missing = entry_for("missing.jpg", b"missing", url="https://127.0.0.1/missing.jpg")
    changed = entry_for("changed.jpg", b"original")
    (tmp_path / "good.jpg").write_bytes(b"good content")
    (tmp_path / "changed.jpg").write_bytes(b"replaced")

    with pytest.raises(DataError) as raised:
        data.check(tmp_path, [good, missing, changed])

    lines = str(raised.value).splitlines()
    assert lines[0] == f"2 of 3 reference files in {tmp_path} are not usable:"
    assert lines[1].startswith(f"  missing.jpg: missing (file not found). Run `stylemodule data fetch --data-dir {tmp_path}`,")
    assert "https://127.0.0.1/missing.jpg" in lines[1]
    assert str(tmp_path / "missing.jpg") in lines[1]
    assert lines[2].startswith("  changed.jpg: sha256 mismatch (expected SHA-256")
    assert lines[2].endswith(f"Delete the file and run `stylemodule data fetch --data-dir {tmp_path}` again.")
    assert len(lines) == 3


def test_check_returns_statuses_when_ok(tmp_path):
    good = entry_for("good.jpg", b"good content")
    (tmp_path / "good.jpg").write_bytes(b"good content")

    assert data.check(tmp_path, [good]) == [
        FileStatus(good, tmp_path / "good.jpg", "ok", "size and SHA-256 match")
    ]


# --- fetch ---


@dataclass
class FileServer:
    """A local HTTP server that serves the files in `root` and records each request path."""

    root: Path
    base_url: str
    requests: list[str]

    def serve(self, name: str, content: bytes) -> str:
        (self.root / name).write_bytes(content)
        return f"{self.base_url}/{name}"


@pytest.fixture
def file_server(tmp_path) -> Iterator[FileServer]:
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval makes shutdown() return quickly (the default is 0.5 s).
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield FileServer(root, f"http://127.0.0.1:{server.server_port}", requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


def test_fetch_downloads_file(file_server, data_dir):
    content = os.urandom(5000)
    entry = entry_for("image.jpg", content, file_server.serve("remote.jpg", content))
    lines: list[str] = []

    statuses = data.fetch(data_dir, [entry], progress=lines.append)

    assert (data_dir / "image.jpg").read_bytes() == content
    assert [status.state for status in statuses] == ["ok"]
    assert file_server.requests == ["/remote.jpg"]
    assert lines == [f"image.jpg: downloaded 5000 bytes from {entry.url}"]
    assert sorted(path.name for path in data_dir.iterdir()) == ["image.jpg"]


def test_fetch_rejects_wrong_content(file_server, data_dir):
    expected = b"expected content"
    served = b"EXPECTED CONTENT"
    entry = entry_for("image.jpg", expected, file_server.serve("image.jpg", served))

    with pytest.raises(DownloadError) as raised:
        data.fetch(data_dir, [entry])

    message = str(raised.value)
    assert "image.jpg" in message
    assert hashlib.sha256(expected).hexdigest() in message
    assert hashlib.sha256(served).hexdigest() in message
    assert list(data_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("served", "problem"),
    [
        pytest.param(b"x" * 200, "expected 100 bytes, but the server sent more", id="too-long"),
        pytest.param(b"x" * 50, "expected 100 bytes, received 50", id="too-short"),
    ],
)
def test_fetch_rejects_wrong_size(file_server, data_dir, served, problem):
    entry = ManifestEntry("image.jpg", file_server.serve("image.jpg", served), GOOD_SHA, 100)

    with pytest.raises(DownloadError, match=problem):
        data.fetch(data_dir, [entry])

    assert list(data_dir.iterdir()) == []


def test_fetch_keeps_old_file_on_mismatch(file_server, data_dir):
    content = b"verified content"
    entry = entry_for("image.jpg", content, file_server.serve("image.jpg", b"VERIFIED CONTENT"))
    data_dir.mkdir()
    (data_dir / "image.jpg").write_bytes(content)

    with pytest.raises(DownloadError, match="does not match the manifest"):
        data.fetch(data_dir, [entry], force=True)

    assert (data_dir / "image.jpg").read_bytes() == content
    assert sorted(path.name for path in data_dir.iterdir()) == ["image.jpg"]


def test_fetch_unreachable_says_copy_by_hand(data_dir):
    entry = entry_for("x.jpg", b"content", f"http://127.0.0.1:{closed_port()}/x.jpg")

    with pytest.raises(DownloadError) as raised:
        data.fetch(data_dir, [entry], timeout=5)

    message = str(raised.value)
    assert message.startswith(f"download of x.jpg from {entry.url} failed (")
    assert f"copy the file by hand into {data_dir} under the name x.jpg" in message
    assert entry.sha256 in message
    assert f"`stylemodule data verify --data-dir {data_dir}`" in message
    assert not (data_dir / "x.jpg").exists()


def test_fetch_http_error_names_status(file_server, data_dir):
    entry = entry_for("x.jpg", b"content", f"{file_server.base_url}/absent.jpg")

    with pytest.raises(DownloadError) as raised:
        data.fetch(data_dir, [entry])

    message = str(raised.value)
    assert "failed (HTTP 404 " in message
    assert "copy the file by hand" in message
    assert list(data_dir.iterdir()) == []


def test_fetch_timeout_names_timeout(data_dir):
    # The listener accepts connections into its backlog but never responds.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/slow.jpg"
        entry = entry_for("slow.jpg", b"content", url)

        with pytest.raises(DownloadError, match=r"failed \(timed out after 0.2 s\)"):
            data.fetch(data_dir, [entry], timeout=0.2)


def test_fetch_skips_verified_file(file_server, data_dir):
    content = b"already here"
    entry = entry_for("image.jpg", content, file_server.serve("image.jpg", content))
    data_dir.mkdir()
    (data_dir / "image.jpg").write_bytes(content)
    lines: list[str] = []

    statuses = data.fetch(data_dir, [entry], progress=lines.append)

    assert file_server.requests == []
    assert [status.state for status in statuses] == ["ok"]
    assert lines == ["image.jpg: already present and verified, skipped"]


def test_fetch_force_downloads_again(file_server, data_dir):
    content = b"already here"
    entry = entry_for("image.jpg", content, file_server.serve("image.jpg", content))
    data_dir.mkdir()
    (data_dir / "image.jpg").write_bytes(content)

    data.fetch(data_dir, [entry], force=True)

    assert file_server.requests == ["/image.jpg"]


def test_fetch_replaces_wrong_file(file_server, data_dir):
    content = b"right content"
    entry = entry_for("image.jpg", content, file_server.serve("image.jpg", content))
    data_dir.mkdir()
    (data_dir / "image.jpg").write_bytes(b"wrong content")

    data.fetch(data_dir, [entry])

    assert (data_dir / "image.jpg").read_bytes() == content
    assert file_server.requests == ["/image.jpg"]


def test_fetch_unwritable_folder(file_server, tmp_path):
    content = b"content"
    entry = entry_for("image.jpg", content, file_server.serve("image.jpg", content))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_bytes(b"")

    with pytest.raises(DownloadError, match="cannot write .*Check that the data folder is writable"):
        data.fetch(not_a_folder, [entry])


def test_fetch_failure_exits_1(data_dir, tmp_path, capsys):
    # A failed download is not bad input (exit code 2), because the command started and then failed.
    entry = entry_for("x.jpg", b"content", f"http://127.0.0.1:{closed_port()}/x.jpg")
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text(f"name\turl\tsha256\tsize\nx.jpg\t{entry.url}\t{entry.sha256}\t{entry.size}\n")

    code = main(["data", "fetch", "--manifest", str(manifest), "--data-dir", str(data_dir), "--timeout", "5"])

    assert code == 1
    assert f"download of x.jpg from {entry.url} failed (" in capsys.readouterr().err
