"""Reference images: the manifest, the data folder, verification and download.

The manifest (`data/manifest.tsv`) lists each image with its source URL, SHA-256 and
size in bytes. The images themselves are not part of the repository. `fetch` downloads
them into the data folder, and `verify` and `check` compare that folder with the manifest.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shlex
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from stylemodule import __version__
from stylemodule.errors import DataError, DownloadError
from stylemodule.files import atomic_path

DATA_ENV = "STYLEMODULE_DATA"
MANIFEST_PATH = Path(__file__).resolve().parent.parent / "data" / "manifest.tsv"
MANIFEST_COLUMNS = ("name", "url", "sha256", "size")
HEADER_LINE = "\t".join(MANIFEST_COLUMNS)

OK = "ok"
MISSING = "missing"
SIZE_MISMATCH = "size mismatch"
SHA256_MISMATCH = "sha256 mismatch"

_CHUNK_BYTES = 1 << 20
_SHA256_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
_SIZE_PATTERN = re.compile(r"[0-9]+")


def resolve_data_dir(option: str | os.PathLike[str] | None = None) -> Path:
    """Return the absolute data folder, which need not exist yet.

    The folder is `option` (the `--data-dir` value) if it is given and not empty, else
    the environment variable STYLEMODULE_DATA if it is set and not empty, else the
    project's `data/` folder beside the manifest.
    """
    if option is not None and os.fspath(option) != "":
        chosen = Path(option)
    elif os.environ.get(DATA_ENV):
        chosen = Path(os.environ[DATA_ENV])
    else:
        chosen = MANIFEST_PATH.parent
    return chosen.expanduser().resolve()


@dataclass(frozen=True)
class ManifestEntry:
    """One reference file: local name, source URL, SHA-256 (lowercase hex) and size in bytes."""

    name: str
    url: str
    sha256: str
    size: int


@dataclass(frozen=True)
class FileStatus:
    """Result of comparing one file in the data folder with its manifest entry.

    `state` is one of "ok", "missing", "size mismatch" and "sha256 mismatch", and
    `detail` explains it in words (expected and found values for a mismatch).
    """

    entry: ManifestEntry
    path: Path
    state: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == OK


def read_manifest(path: str | os.PathLike[str] = MANIFEST_PATH) -> list[ManifestEntry]:
    """Parse and validate a manifest file.

    The first line that is neither blank nor a `#` comment must be the header
    `name<TAB>url<TAB>sha256<TAB>size`. Every later such line is one entry. Raises
    DataError naming the file, the line number and the problem for any invalid line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"manifest {path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read manifest {path}: {error}") from error

    entries: list[ManifestEntry] = []
    line_of_name: dict[str, int] = {}
    header_seen = False
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [field.strip() for field in line.split("\t")]
        where = f"{path} line {line_number}"

        if not header_seen:
            if tuple(fields) != MANIFEST_COLUMNS:
                raise DataError(
                    f"{where}: expected the header {HEADER_LINE!r}, found {line!r}"
                )
            header_seen = True
            continue

        entry = _parse_entry(fields, where)
        # Compare names ignoring case, because two such names are one file on
        # case-insensitive file systems (macOS and Windows by default).
        key = entry.name.casefold()
        if key in line_of_name:
            raise DataError(
                f"{where}: duplicate name {entry.name!r}, already listed on line "
                f"{line_of_name[key]} (names must be unique, ignoring case)"
            )
        line_of_name[key] = line_number
        entries.append(entry)

    if not header_seen:
        raise DataError(f"manifest {path} has no header line and no entries")
    if not entries:
        raise DataError(f"manifest {path} lists no files")
    return entries


def _parse_entry(fields: list[str], where: str) -> ManifestEntry:
    """Build one entry from the tab-separated fields of a manifest line."""
    if len(fields) != len(MANIFEST_COLUMNS):
        raise DataError(
            f"{where}: expected {len(MANIFEST_COLUMNS)} tab-separated columns "
            f"({', '.join(MANIFEST_COLUMNS)}), found {len(fields)}"
        )
    name, url, sha256, size_text = fields

    name_problem = _name_problem(name)
    if name_problem:
        raise DataError(f"{where}: {name_problem}")

    scheme, netloc, *_ = urllib.parse.urlsplit(url)
    if scheme.lower() not in ("http", "https") or not netloc:
        raise DataError(f"{where}: url {url!r} is not an http or https URL")

    if not _SHA256_PATTERN.fullmatch(sha256):
        raise DataError(f"{where}: sha256 {sha256!r} is not 64 hexadecimal digits")

    if not _SIZE_PATTERN.fullmatch(size_text) or int(size_text) <= 0:
        raise DataError(f"{where}: size {size_text!r} is not a positive integer number of bytes")

    return ManifestEntry(name=name, url=url, sha256=sha256.lower(), size=int(size_text))


def _name_problem(name: str) -> str | None:
    """Return why `name` is not a safe plain file name in the data folder, or None."""
    if not name:
        return "name is empty. Use a plain file name."
    outside = f"name {name!r} would write outside the data folder. Use a plain file name."
    if name in (".", ".."):
        return outside
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute():
        return outside
    # A Windows drive ("C:evil.jpg") points outside the folder even without a separator.
    if "/" in name or "\\" in name or PureWindowsPath(name).drive:
        return outside
    if name.startswith("."):
        # A hidden name could also clash with the ".NAME.*.tmp" files of `atomic_path`.
        return f"name {name!r} starts with '.', which makes a hidden file. Use a plain file name."
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        return f"name {name!r} contains a control character. Use a plain file name."
    return None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the SHA-256 of a file as lowercase hex, reading it in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify(data_dir: str | os.PathLike[str], entries: Iterable[ManifestEntry]) -> list[FileStatus]:
    """Compare each entry's file in `data_dir` with the entry's size and SHA-256.

    Returns one FileStatus per entry, in order. Raises DataError if a file exists but
    cannot be read.
    """
    data_dir = Path(data_dir)
    return [_verify_one(data_dir / entry.name, entry) for entry in entries]


def _verify_one(path: Path, entry: ManifestEntry) -> FileStatus:
    if not path.exists():
        return FileStatus(entry, path, MISSING, "file not found")
    if not path.is_file():
        return FileStatus(entry, path, MISSING, "path exists but is not a regular file")

    try:
        size = path.stat().st_size
        if size != entry.size:
            detail = f"expected {entry.size} bytes, found {size}"
            return FileStatus(entry, path, SIZE_MISMATCH, detail)
        sha256 = sha256_file(path)
    except OSError as error:
        raise DataError(f"cannot read {path}: {error}") from error

    if sha256 != entry.sha256:
        detail = f"expected SHA-256 {entry.sha256}, found {sha256}"
        return FileStatus(entry, path, SHA256_MISMATCH, detail)
    return FileStatus(entry, path, OK, "size and SHA-256 match")


def data_command(action: str, data_dir: str | os.PathLike[str]) -> str:
    """Return the `stylemodule data ACTION` command line for `data_dir`, quoted for a shell."""
    return f"stylemodule data {action} --data-dir {shlex.quote(str(data_dir))}"


def check(data_dir: str | os.PathLike[str], entries: Iterable[ManifestEntry]) -> list[FileStatus]:
    """Verify every file and raise DataError unless all of them are ok.

    The message lists each file that is not ok, with its state and what to do about
    it. Returns the statuses when all files are ok.
    """
    data_dir = Path(data_dir)
    statuses = verify(data_dir, entries)
    bad = [status for status in statuses if not status.ok]
    if not bad:
        return statuses

    fetch = data_command("fetch", data_dir)
    lines = [f"{len(bad)} of {len(statuses)} reference files in {data_dir} are not usable:"]
    for status in bad:
        entry = status.entry
        if status.state == MISSING:
            action = f"Run `{fetch}`, or download {entry.url} by hand and save it as {status.path}."
        else:
            action = f"Delete the file and run `{fetch}` again."
        lines.append(f"  {entry.name}: {status.state} ({status.detail}). {action}")
    raise DataError("\n".join(lines))


def fetch(
    data_dir: str | os.PathLike[str],
    entries: Iterable[ManifestEntry],
    *,
    timeout: float = 30.0,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[FileStatus]:
    """Download each file that is missing or does not match the manifest.

    Files that already match are skipped unless `force` is set. Each download goes to
    a temporary file and is renamed only after its size and SHA-256 match, so a failed
    or wrong download leaves the previous file (or no file) in place. `timeout` is in
    seconds and applies to the connection and to each read, not to the whole download.
    `progress`, if given, receives one line per file.

    Stops at the first failure and raises DownloadError. Files fetched before it stay.
    Returns one FileStatus per entry, all of them ok.
    """
    data_dir = Path(data_dir)
    statuses: list[FileStatus] = []
    for entry in entries:
        path = data_dir / entry.name
        if not force:
            status = _verify_one(path, entry)
            if status.ok:
                statuses.append(status)
                if progress is not None:
                    progress(f"{entry.name}: already present and verified, skipped")
                continue

        try:
            with atomic_path(path) as temporary:
                _download(entry, temporary, data_dir, timeout)
        except OSError as error:
            # Download errors are already DownloadErrors, so this is the local disk:
            # creating the folder, writing the temporary file or renaming it.
            raise DownloadError(
                f"cannot write {path}: {error}. Check that the data folder is writable "
                f"and has free space."
            ) from error

        statuses.append(FileStatus(entry, path, OK, "downloaded, size and SHA-256 match"))
        if progress is not None:
            progress(f"{entry.name}: downloaded {entry.size} bytes from {entry.url}")
    return statuses


def _download(entry: ManifestEntry, destination: Path, data_dir: Path, timeout: float) -> None:
    """Download `entry` into `destination` and raise DownloadError unless it matches the manifest.

    Raises OSError only for local write errors.
    """
    headers = {"User-Agent": f"stylemodule/{__version__}"}
    request = urllib.request.Request(entry.url, headers=headers)
    digest = hashlib.sha256()
    received = 0
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except (OSError, http.client.HTTPException, ValueError) as error:
        if isinstance(error, urllib.error.HTTPError):
            error.close()  # An HTTPError contains the open response, so close it.
        raise _download_error(entry, data_dir, error, timeout) from error

    with response, open(destination, "wb") as output:
        while True:
            try:
                chunk = response.read(_CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as error:
                raise _download_error(entry, data_dir, error, timeout) from error
            if not chunk:
                break
            received += len(chunk)
            if received > entry.size:
                # Stop reading, so a wrong URL cannot fill the disk.
                raise DownloadError(
                    f"download of {entry.name} from {entry.url} does not match the manifest: "
                    f"expected {entry.size} bytes, but the server sent more. The file was not "
                    f"saved. Check the URL in the manifest."
                )
            digest.update(chunk)
            output.write(chunk)

    if received != entry.size:
        raise DownloadError(
            f"download of {entry.name} from {entry.url} does not match the manifest: "
            f"expected {entry.size} bytes, received {received} (SHA-256 {digest.hexdigest()}). "
            f"The file was not saved. Check the URL in the manifest."
        )
    if digest.hexdigest() != entry.sha256:
        raise DownloadError(
            f"download of {entry.name} from {entry.url} does not match the manifest: "
            f"expected SHA-256 {entry.sha256}, received {digest.hexdigest()}. "
            f"The file was not saved. The source may have changed, so check the URL "
            f"in the manifest."
        )


def _download_error(
    entry: ManifestEntry, data_dir: Path, error: BaseException, timeout: float
) -> DownloadError:
    """Build the DownloadError for a failed download, with the steps to place the file by hand."""
    if isinstance(error, urllib.error.HTTPError):
        reason = f"HTTP {error.code} {error.reason}"
    elif isinstance(error, TimeoutError) or (
        isinstance(error, urllib.error.URLError) and isinstance(error.reason, TimeoutError)
    ):
        reason = f"timed out after {timeout:g} s"
    elif isinstance(error, urllib.error.URLError):
        reason = str(error.reason)
    else:
        reason = str(error) or type(error).__name__
    return DownloadError(
        f"download of {entry.name} from {entry.url} failed ({reason}). If this machine is "
        f"offline, copy the file by hand into {data_dir} under the name {entry.name} "
        f"(SHA-256 {entry.sha256}, {entry.size} bytes), then run `{data_command('verify', data_dir)}`."
    )
