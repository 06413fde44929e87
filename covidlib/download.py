"""Data set registry, downloads and safe archive extraction.

Standard library only (``urllib``, ``zipfile``, ``tarfile``); ``kagglehub`` is an optional
dependency (``pip install covidlib[download]``), imported only when a Kaggle download is needed.

Where the data come from, in order (:func:`resolve`):

1. A local path (file or folder) is used as it is. On **Colab**, mount Google Drive
   (``from google.colab import drive; drive.mount("/content/drive")``) and pass the folder, e.g.
   ``/content/drive/MyDrive/covid-ct``: a Drive folder is just a local path.
2. On a **Kaggle** notebook (``/kaggle/input`` exists) a registry data set attached to the notebook
   ("Add data") is used in place from ``/kaggle/input/<slug>``: nothing is copied or downloaded.
3. Otherwise it is downloaded once into ``dest`` (default ``config.data_dir()/<short name>``) with
   ``kagglehub`` (Kaggle sets) or over HTTPS (archives, resumable, checksum-verified when known)
   and extracted safely. A folder that is already there is reused.

Failures (offline, no ``kagglehub``, no credentials, bad archive) raise :class:`DownloadError` with a
message that says what to do. Credentials are never printed, logged or put into a message.
"""
from __future__ import annotations

import hashlib
import http.client
import inspect
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from covidlib import config

__all__ = [
    "DatasetInfo",
    "DownloadError",
    "UnknownDatasetError",
    "UnsafeArchiveError",
    "REGISTRY",
    "KAGGLE_INPUT_ROOT",
    "get_info",
    "dataset_names",
    "registry_table",
    "resolve",
    "download_https",
    "safe_extract",
]

# Where a Kaggle kernel mounts attached data sets (COVIDLIB_KAGGLE_INPUT: elsewhere, e.g. in tests).
KAGGLE_INPUT_ROOT = Path(os.environ.get("COVIDLIB_KAGGLE_INPUT", "/kaggle/input"))
# A cheap reachability probe before handing over to kagglehub, so "offline" fails in seconds.
_KAGGLE_PROBE: tuple[str, int] = ("www.kaggle.com", 443)
DEFAULT_TIMEOUT = 30.0  # seconds without a byte before a download gives up (not the total time)
# A server that drips a byte now and then never trips the idle timeout: a download also stops
# at a total deadline, and when its average rate stays below a minimum after a grace period.
DEFAULT_DEADLINE = 12 * 3600.0  # seconds for one download_https call (a partial file resumes)
DEFAULT_MIN_RATE = 10 * 1024  # bytes per second, on average since the request
DEFAULT_RATE_GRACE = 60.0  # seconds before the minimum rate applies (connection set-up, slow start)
# Extraction limits. The size cap defaults to the target's free space less a margin.
FREE_SPACE_MARGIN = 1024**3
DEFAULT_MAX_FILES = 2_000_000
MAX_RATIO = 200  # uncompressed / compressed, for the whole archive and for each zip member
RATIO_FLOOR = 64 * 1024**2  # below this many uncompressed bytes no ratio is too high (text, masks)
MAX_NAME_BYTES = 255  # one path component (NAME_MAX of Linux, macOS and Windows file systems)
MAX_PATH_BYTES = 4096  # a whole path (PATH_MAX of Linux)
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A data set could not be obtained; the message says what to do instead."""


class UnknownDatasetError(ValueError):
    """The name is neither a local path nor a registry entry."""


class UnsafeArchiveError(DownloadError):
    """An archive member would escape the target, is a link/device, or the archive is too big."""


@dataclass(frozen=True)
class DatasetInfo:
    """One registry entry.

    Attributes:
        name: short name (``"sarscov2-ct"``); also the default folder name under the data dir.
        title: human title.
        kind: ``"kaggle"`` | ``"https"`` | ``"github"`` (a GitHub archive over HTTPS).
        handle: Kaggle handle ``owner/slug``, or the archive URL for https/github.
        licence: licence as stated by the source, or None when not verified.
        classes: raw class names as the source spells them.
        label_map: raw class name -> canonical label (None = not used by default).
        modality: ``"ct"`` or ``"xray"``.
        expected_counts: raw class -> number of images (only where verified), else None.
        expected_total: total number of images (only where verified), else None.
        citation: what to cite.
        notes: provenance, layout and known faults.
        page: web page to download it by hand.
        sha256: checksum of the archive (https kinds), when known.
        archives_inside: archives inside the download to extract as well (relative paths).
        manual: True when there is no automatic download (registration / form).
        aliases: other accepted names.
    """

    name: str
    title: str
    kind: str
    handle: str
    licence: str | None
    classes: tuple[str, ...]
    label_map: dict[str, str | None]
    modality: str
    expected_counts: dict[str, int] | None
    expected_total: int | None
    citation: str
    notes: str
    page: str
    sha256: str | None = None
    archives_inside: tuple[str, ...] = ()
    manual: bool = False
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def slug(self) -> str:
        """Last part of a Kaggle handle (the ``/kaggle/input/<slug>`` folder name)."""
        return self.handle.rstrip("/").rsplit("/", 1)[-1]


_COVIDX_CLASSES = ("Normal", "Pneumonia", "COVID-19")
_COVIDX_MAP = {"Normal": "normal", "Pneumonia": "cap", "COVID-19": "covid"}
_AICOV_CITE = (
    "AICOV-CT Kaggle copies of COVIDx CT. Cite COVIDx CT: Gunraj H, Sabri A, Koff D, Wong A. "
    "COVID-Net CT-2: Enhanced Deep Neural Networks for Detection of COVID-19 From Chest CT Images "
    "Through Bigger, More Diverse Learning. Front. Med. 2022; and the sources listed by COVIDx CT."
)
_AICOV_NOTES = (
    "One part of the AICOV-CT data (derived from COVIDx CT; ~128,700 slices over all five AICOV-CT "
    "Kaggle sets, 3 classes). Per-set counts and exact folder names not verified here; ingest maps "
    "the usual aliases (Normal/normal, Pneumonia/CAP -> cap, COVID-19/COVID -> covid). COVIDx CT "
    "has patient ids in its file names; many slices per patient, so split by patient. "
    "Known faults: classes come from different source collections (shortcut risk) - run the audit."
)


def _aicov(name: str, slug: str, title: str, enhanced: bool) -> DatasetInfo:
    return DatasetInfo(
        name=name, title=title, kind="kaggle", handle=f"ironman3537/{slug}", licence=None,
        classes=_COVIDX_CLASSES, label_map=dict(_COVIDX_MAP), modality="ct",
        expected_counts=None, expected_total=None, citation=_AICOV_CITE,
        notes=_AICOV_NOTES + (" Images already enhanced (crop + white balance + CLAHE) by the "
                              "AICOV-CT authors: do not enhance twice." if enhanced else ""),
        page=f"https://www.kaggle.com/datasets/ironman3537/{slug}",
    )


_ENTRIES: list[DatasetInfo] = [
    _aicov("aicov-ct-train", "train-no-enhanced", "AICOV-CT train split (not enhanced)", False),
    _aicov("aicov-ct-val", "val-no-enhanced", "AICOV-CT validation split (not enhanced)", False),
    _aicov("aicov-ct-test", "test-no-enhanced", "AICOV-CT test split (not enhanced)", False),
    _aicov("aicov-ct-train-enhanced", "train-images-enhanced", "AICOV-CT train split (enhanced)", True),
    _aicov("aicov-ct-val-test-enhanced", "val-test-images",
           "AICOV-CT validation + test images (published beside train-images-enhanced; "
           "that it is enhanced is inferred, not verified)", True),
    DatasetInfo(
        name="omicron-delta-ct",
        title="COVID-19 Omicron and Delta variant CT scan data set (two-phase seed, CT phase)",
        kind="kaggle", handle="mohammadamireshraghi/covid19-omicron-and-delta-variant-ct-scan-dataset",
        licence=None, classes=("positive", "negative"),
        label_map={"positive": "covid", "negative": "non_covid"}, modality="ct",
        expected_counts={"positive": 12231, "negative": 2251}, expected_total=14482,
        citation="Eshraghi MA et al., COVID-19 Omicron and Delta variant CT scan data set (Kaggle).",
        notes=("512x512 JPG slices, binary, strongly imbalanced (~5.4:1). Raw folder names not "
               "verified; no patient ids known, so slices of one patient can leak across splits."),
        page="https://www.kaggle.com/datasets/mohammadamireshraghi/covid19-omicron-and-delta-variant-ct-scan-dataset",
    ),
    DatasetInfo(
        name="omicron-delta-xray",
        title="COVID-19 local X-ray data (two-phase seed, X-ray phase)",
        kind="kaggle", handle="mohammadamireshraghi/covid19-xray-local-data",
        licence=None, classes=("positive", "negative"),
        label_map={"positive": "covid", "negative": "non_covid"}, modality="xray",
        expected_counts={"positive": 111, "negative": 230}, expected_total=341,
        citation="Eshraghi MA et al., COVID-19 X-ray local data (Kaggle).",
        notes="341 chest X-rays, binary. Very small: confidence intervals will be wide.",
        page="https://www.kaggle.com/datasets/mohammadamireshraghi/covid19-xray-local-data",
    ),
    DatasetInfo(
        name="covidx-ct", title="COVIDx CT (COVID-Net CT)", kind="kaggle", handle="hgunraj/covidxct",
        licence=None, classes=_COVIDX_CLASSES, label_map=dict(_COVIDX_MAP), modality="ct",
        expected_counts=None, expected_total=None,
        citation=("Gunraj H, Wang L, Wong A. COVIDNet-CT: A Tailored Deep Convolutional Neural Network "
                  "Design for Detection of COVID-19 Cases From Chest CT Images. Front. Med. 2020; "
                  "Gunraj H et al., COVID-Net CT-2, Front. Med. 2022."),
        notes=("Slices as PNG with label files ({train,val,test}_COVIDx_CT-*.txt: file name, class "
               "0/1/2 = Normal/Pneumonia/COVID-19, lung bounding box xmin ymin xmax ymax). The Kaggle "
               "page holds the newest version (CT-3A/3B since 2022); counts depend on the version, "
               "hundreds of thousands of slices - check the disk. Built from many public sources, "
               "each with its own licence (see the COVID-Net repository)."),
        page="https://www.kaggle.com/datasets/hgunraj/covidxct",
    ),
    DatasetInfo(
        name="covid-radiography", title="COVID-19 Radiography Database", kind="kaggle",
        handle="tawsifurrahman/covid19-radiography-database", licence=None,
        classes=("COVID", "Normal", "Lung_Opacity", "Viral Pneumonia"),
        label_map={"COVID": "covid", "Normal": "normal", "Lung_Opacity": None, "Viral Pneumonia": "cap"},
        modality="xray",
        expected_counts={"COVID": 3616, "Normal": 10192, "Lung_Opacity": 6012, "Viral Pneumonia": 1345},
        expected_total=21165,
        citation=("Chowdhury MEH et al. Can AI help in screening Viral and COVID-19 pneumonia? IEEE "
                  "Access 8, 2020; Rahman T et al. Exploring the effect of image enhancement "
                  "techniques on COVID-19 detection using chest X-ray images. Comput Biol Med 2021."),
        notes=("299x299 PNG with lung masks (counts: the release with 21,165 images). Known faults: "
               "classes come from different collections (COVID from PadChest, a German school, SIRM, "
               "GitHub...; Normal mostly RSNA; Viral Pneumonia from a paediatric pneumonia set) - a "
               "strong source/age shortcut. Viral Pneumonia -> cap follows the project convention "
               "(docs/data.md; a simplification). Lung_Opacity (non-COVID opacities) is unmapped, "
               "i.e. left out by default; map it explicitly for a covid / non_covid task."),
        page="https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
    ),
    DatasetInfo(
        name="sarscov2-ct", title="SARS-CoV-2 CT-scan dataset (Soares et al.)", kind="kaggle",
        handle="plameneduardo/sarscov2-ctscan-dataset", licence=None,
        classes=("COVID", "non-COVID"), label_map={"COVID": "covid", "non-COVID": "non_covid"},
        modality="ct", expected_counts={"COVID": 1252, "non-COVID": 1230}, expected_total=2482,
        citation=("Soares E, Angelov P, Biaso S, Higa Froes M, Kanda Abe D. SARS-CoV-2 CT-scan "
                  "dataset: A large dataset of real patients CT scans for SARS-CoV-2 identification. "
                  "medRxiv 2020."),
        notes=("CT slices (PNG) from hospitals in Sao Paulo, Brazil. Several slices per patient but "
               "no patient ids in the release: random splits leak patients. non-COVID includes other "
               "lung diseases."),
        page="https://www.kaggle.com/datasets/plameneduardo/sarscov2-ctscan-dataset",
    ),
    DatasetInfo(
        name="ucsd-covid-ct", title="COVID-CT (UCSD-AI4H)", kind="github",
        handle="https://github.com/UCSD-AI4H/COVID-CT/archive/refs/heads/master.zip",
        licence="images: copyright of the source papers (medRxiv / bioRxiv etc.), per the repository",
        classes=("CT_COVID", "CT_NonCOVID"), label_map={"CT_COVID": "covid", "CT_NonCOVID": "non_covid"},
        modality="ct", expected_counts={"CT_COVID": 349, "CT_NonCOVID": 397}, expected_total=746,
        citation=("Zhao J, Zhang Y, He X, Xie P. COVID-CT-Dataset: a CT scan dataset about COVID-19. "
                  "arXiv:2003.13865, 2020."),
        notes=("349 COVID images from 216 patients, cut from figures of COVID-19 preprints; "
               "non-COVID images from other sources. Images vary in size and quality and some carry "
               "annotations/arrows: a strong source shortcut. Images are in "
               "Images-processed/CT_COVID.zip and CT_NonCOVID.zip inside the repository archive "
               "(extracted automatically); the repository's Data-split folder has the authors' "
               "patient-disjoint split lists."),
        page="https://github.com/UCSD-AI4H/COVID-CT",
        archives_inside=("COVID-CT-master/Images-processed/CT_COVID.zip",
                         "COVID-CT-master/Images-processed/CT_NonCOVID.zip"),
    ),
    DatasetInfo(
        name="mosmeddata", title="MosMedData: chest CT with COVID-19 related findings (COVID19_1110)",
        kind="https", handle="https://mosmed.ai/datasets/covid191110/", licence="CC BY-NC-ND 3.0",
        classes=("CT-0", "CT-1", "CT-2", "CT-3", "CT-4"),
        label_map={"CT-0": "normal", "CT-1": "covid", "CT-2": "covid", "CT-3": "covid", "CT-4": "covid"},
        modality="ct", expected_counts={"CT-0": 254, "CT-1": 684, "CT-2": 125, "CT-3": 45, "CT-4": 2},
        expected_total=1110,
        citation=("Morozov SP et al. MosMedData: Chest CT Scans With COVID-19 Related Findings "
                  "Dataset. arXiv:2005.06465, 2020."),
        notes=("1,110 CT studies (one per patient, NIfTI volumes), graded CT-0 (normal) to CT-4 by "
               "lung involvement; 50 studies have lesion masks. Counts are studies, not slices. "
               "Download by hand from the page and pass the folder."),
        page="https://mosmed.ai/datasets/covid191110/",
        manual=True,
    ),
]

REGISTRY: dict[str, DatasetInfo] = {e.name: e for e in _ENTRIES}


def _lookup_table() -> dict[str, DatasetInfo]:
    table: dict[str, DatasetInfo] = {}
    for e in _ENTRIES:
        keys = {e.name, *e.aliases}
        if e.kind == "kaggle":
            keys |= {e.handle, f"kaggle:{e.handle}", e.page, e.page.replace("/datasets/", "/")}
        else:
            keys.add(e.page)
        for k in keys:
            table[k.lower().rstrip("/")] = e
    return table


def dataset_names() -> list[str]:
    """Short names of all registry entries."""
    return list(REGISTRY)


def get_info(name: str) -> DatasetInfo:
    """Registry entry for a short name, a Kaggle handle (``owner/slug``) or its Kaggle URL.

    Raises:
        UnknownDatasetError: not in the registry (the message lists the known names).
    """
    key = str(name).strip().lower().rstrip("/")
    found = _lookup_table().get(key)
    if found is None:
        raise UnknownDatasetError(_unknown_message(str(name)))
    return found


def _unknown_message(name: str) -> str:
    listing = ", ".join(f"{e.name} ({e.handle})" if e.kind == "kaggle" else e.name for e in _ENTRIES)
    return (
        f"unknown data set {name!r}: it is not an existing local path and not in the registry. "
        f"Known names: {listing}. Or pass a local folder, or 'kaggle:<owner>/<slug>' for another "
        "Kaggle data set."
    )


def registry_table() -> str:
    """The registry as a Markdown table (used by docs/datasets.md)."""
    rows = ["| name | source | licence | modality | classes (raw -> canonical) | expected images |",
            "|---|---|---|---|---|---|"]
    for e in _ENTRIES:
        src = f"Kaggle `{e.handle}`" if e.kind == "kaggle" else f"[{e.kind}]({e.page})"
        cls = ", ".join(f"{c} -> {e.label_map.get(c) or '(unmapped)'}" for c in e.classes)
        if e.expected_counts:
            cnt = " / ".join(f"{e.expected_counts[c]:,}" for c in e.classes if c in e.expected_counts)
            cnt += f" (total {e.expected_total:,})" if e.expected_total else ""
        else:
            cnt = "not verified"
        rows.append(f"| `{e.name}` | {src} | {e.licence or 'not stated / check the page'} | "
                    f"{e.modality} | {cls} | {cnt} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Secrets never leave this module
# --------------------------------------------------------------------------------------------

_TOKEN_RX = re.compile(r"\b[0-9a-fA-F]{32,}\b")


def _scrub(text: str) -> str:
    """Remove anything that might be a credential from a message."""
    for var in ("KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_PASSWORD"):
        val = os.environ.get(var)
        if val and len(val) >= 4:
            text = text.replace(val, "***")
    text = _TOKEN_RX.sub("***", text)  # Kaggle API keys are 32 hex characters
    return re.sub(r"(?i)(key|token|password|secret)(\s*[=:]\s*)\S+", r"\1\2***", text)


def _public_url(url: str) -> str:
    """URL without user info, query or fragment, for messages."""
    try:
        p = urllib.parse.urlsplit(url)
        host = p.hostname or ""
        if p.port:
            host = f"{host}:{p.port}"
        return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))
    except ValueError:
        return "<url>"


# --------------------------------------------------------------------------------------------
# HTTPS download (resumable, verified, atomic)
# --------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class _Deadline:
    """Shuts a download's socket down when its total time is up.

    A thread blocked in a read cannot look at a clock, and a server that sends a byte now and
    then never trips the idle timeout; shutting the socket from a timer wakes the read.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.fired, self._sock = seconds, False, None
        self._lock = threading.Lock()
        self._timer = None
        if seconds is not None:
            self._timer = threading.Timer(max(0.0, seconds), self._fire)
            self._timer.daemon = True
            self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            fired = self.fired
        if fired:
            _shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            sock = self._sock
        if sock is not None:
            _shutdown(sock)

    def stop(self) -> bool:
        """Cancel the timer; True when the deadline had already passed."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            return self.fired


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """A urllib opener whose HTTP(S) connections hand their socket to ``deadline``."""
    def watched(conn_class):
        class Watched(conn_class):
            def connect(self):
                super().connect()
                deadline.watch(self.sock)
        return Watched

    class HTTP(urllib.request.HTTPHandler):
        def do_open(self, http_class, req, **kw):
            return super().do_open(watched(http_class), req, **kw)

    class HTTPS(urllib.request.HTTPSHandler):
        def do_open(self, http_class, req, **kw):
            return super().do_open(watched(http_class), req, **kw)

    return urllib.request.build_opener(HTTP, HTTPS)


@dataclass(frozen=True)
class _Pace:
    """The limits of one download (see :func:`download_https`)."""

    timeout: float
    min_rate: float | None
    rate_grace: float
    start: float


def _receive(resp, part: Path, offset: int, shown: str, pace: _Pace,
             progress: Callable[[int, int | None], None] | None) -> int | None:
    """Write a response's body to ``part`` (appending after ``offset`` on a 206); return the total."""
    status = getattr(resp, "status", 200)
    length = resp.headers.get("Content-Length")
    if status == 206:
        m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            raise DownloadError(f"{shown}: server sent an unexpected byte range; delete {part} and "
                                "run again")
        total, mode = (int(m.group(3)) if m.group(3) != "*" else None), "ab"
    else:  # 200: the server ignored the range (or there was none): start from 0
        offset, mode = 0, "wb"
        total = int(length) if length and length.isdigit() else None
    done, got = offset, 0
    with open(part, mode) as fh:
        # read1: returns what has arrived, so the rate is checked while a slow server trickles.
        while block := resp.read1(_CHUNK):
            fh.write(block)
            done, got = done + len(block), got + len(block)
            if progress is not None:
                progress(done, total)
            elapsed = time.monotonic() - pace.start
            if pace.min_rate and elapsed > pace.rate_grace and got / elapsed < pace.min_rate:
                raise DownloadError(
                    f"download of {shown} stopped: {got / elapsed:,.0f} bytes/s on average over "
                    f"{elapsed:.0f} s, below the minimum rate of {pace.min_rate:,.0f} bytes/s "
                    f"(min_rate); {done:,} bytes kept. Run again to resume, or lower min_rate.")
    return total


def _transfer(url: str, part: Path, offset: int, shown: str, pace: _Pace, deadline: float | None,
              progress) -> tuple[int | None, bool]:
    """One HTTP request for the bytes of ``url`` after ``offset``, written into ``part``.

    Returns:
        ``(total size or None when the server did not say, whether the deadline cut it off)``.
    """
    headers = {"User-Agent": "covidlib-download/1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(str(url), headers=headers)
    clock = _Deadline(deadline)
    try:
        try:
            resp = _opener(clock).open(req, timeout=pace.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:
                # Range not satisfiable: the part file already holds everything (or is bogus).
                return None, clock.stop()
            raise DownloadError(f"download of {shown} failed: HTTP {exc.code} {exc.reason}") from None
        with resp:
            return _receive(resp, part, offset, shown, pace, progress), clock.stop()
    except (http.client.HTTPException, urllib.error.URLError, OSError) as exc:
        # A read woken by the deadline's shutdown fails in many ways; name the deadline.
        raise (_deadline_error(shown, part, deadline) if clock.stop()
               else _network_error(exc, shown, part, pace.timeout)) from None
    finally:
        clock.stop()


def _check_part(part: Path, total: int | None, fired: bool, want: str | None, shown: str,
                deadline: float | None) -> None:
    """A finished transfer's part file must be complete and (when known) match its checksum."""
    size = part.stat().st_size if part.exists() else 0
    if fired and (total is None or size != total):
        raise _deadline_error(shown, part, deadline)  # the shutdown reads as an early end
    if total is not None and size != total:
        raise DownloadError(f"{shown}: got {size} of {total} bytes; run again to resume")
    if want:
        got = _sha256(part)
        if got != want:
            part.unlink()
            raise DownloadError(
                f"checksum mismatch for {shown}: expected SHA-256 {want}, got {got}. The file was "
                "discarded (corrupt, or the source changed); run again, or report it."
            )


def _deadline_error(shown: str, part: Path, seconds: float) -> DownloadError:
    kept = part.stat().st_size if part.exists() else 0
    return DownloadError(f"download of {shown} stopped: the total deadline of {seconds:g} s passed "
                         f"(deadline); {kept:,} bytes kept. Run again to resume, or raise deadline.")


def _network_error(exc: BaseException, shown: str, part: Path, timeout: float) -> DownloadError:
    kept = part.stat().st_size if part.exists() else 0
    reason = getattr(exc, "reason", exc)
    if isinstance(exc, http.client.HTTPException):  # e.g. IncompleteRead: the connection dropped
        return DownloadError(f"download of {shown} was interrupted ({type(exc).__name__}) after "
                             f"{kept:,} bytes; run again to resume.")
    if isinstance(reason, TimeoutError) and kept:
        return DownloadError(f"download of {shown} stopped: no data for {timeout:g} s (timeout); "
                             f"{kept:,} bytes kept. Run again to resume.")
    return DownloadError(
        f"cannot download {shown}: {_scrub(str(reason))}. Check the internet connection "
        "(offline? proxy?) and run again - a partial download resumes. Or download it by hand "
        "and pass the file/folder instead.")


def download_https(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    resume: bool = True,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    deadline: float | None = DEFAULT_DEADLINE,
    min_rate: float | None = DEFAULT_MIN_RATE,
    rate_grace: float = DEFAULT_RATE_GRACE,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download ``url`` to the file ``dest``: resumable, verified, atomic, bounded in time.

    Bytes go to ``dest + ".part"``; an interrupted download keeps it and the next call asks the
    server for the rest (HTTP ``Range``). When complete (and the SHA-256 matches, if given) the part
    file is renamed to ``dest``, so ``dest`` only ever exists complete. An existing ``dest`` is
    returned as it is (after checking ``sha256`` when given).

    Args:
        url: ``http://`` or ``https://`` URL.
        dest: target file path.
        sha256: expected hex digest, or None when unknown.
        resume: continue a previous ``.part`` file (False: start again).
        timeout: seconds to wait for the connection / the next bytes.
        deadline: seconds for the whole call (None: no limit); a server that sends a byte now
            and then is cut off here.
        min_rate: bytes per second, on average since the request, below which the download stops
            once ``rate_grace`` seconds have passed (None or 0: no minimum).
        rate_grace: seconds before ``min_rate`` applies.
        progress: optional callback ``(bytes_done, total_or_None)``.

    Returns:
        ``dest`` as a Path.

    Raises:
        ValueError: not an http(s) URL.
        DownloadError: network failure, idle timeout, deadline or minimum rate (the message names
            the limit; the part file is kept for resuming), HTTP error, size or checksum mismatch
            (the part file is deleted; no ``dest`` is created).
    """
    scheme = urllib.parse.urlsplit(str(url)).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"download_https needs an http(s) URL, got scheme {scheme!r}")
    dest = Path(dest)
    shown = _public_url(url)
    want = sha256.lower() if sha256 else None
    if dest.exists():
        if want and _sha256(dest) != want:
            raise DownloadError(
                f"{dest} exists but its SHA-256 does not match the expected checksum; delete it "
                "and run again."
            )
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if not resume and part.exists():
        part.unlink()
    offset = part.stat().st_size if part.exists() else 0
    pace = _Pace(timeout, min_rate, rate_grace, time.monotonic())
    total, fired = _transfer(url, part, offset, shown, pace, deadline, progress)
    _check_part(part, total, fired, want, shown, deadline)
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------------

def _safe_relpath(name: str) -> PurePosixPath | None:
    """Archive member name -> safe relative path; None for the root itself; raise if unsafe."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"archive member name contains a NUL byte: {name!r}")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise UnsafeArchiveError(f"archive member has an absolute path: {name!r}")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"archive member has a '..' component: {name!r}")
    return PurePosixPath(*parts) if parts else None


def _zip_members(zf: zipfile.ZipFile):
    for info in zf.infolist():
        # Unix-made zips keep st_mode in the high 16 bits; the file-type bits may be 0 (unknown).
        ftype = stat.S_IFMT((info.external_attr >> 16) & 0xFFFF)
        if ftype == stat.S_IFLNK:
            kind = "link"
        elif ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
            kind = "special"
        else:
            kind = "dir" if info.is_dir() else "file"
        yield info.filename, kind, info.file_size, info


def _tar_members(tf: tarfile.TarFile):
    for m in tf:
        if m.issym() or m.islnk():
            kind = "link"
        elif m.isdir():
            kind = "dir"
        elif m.isreg():
            kind = "file"
        else:
            kind = "special"  # devices, FIFOs, ...
        yield m.name, kind, m.size, m


@dataclass(frozen=True)
class _Limits:
    """What one extraction may write; ``why`` says where ``max_bytes`` came from."""

    max_bytes: int
    max_files: int
    max_ratio: float | None
    packed: int  # size of the archive file
    why: str


def _free_space_cap(folder: Path) -> tuple[int, str]:
    """The default size cap: free space of ``folder``'s file system less :data:`FREE_SPACE_MARGIN`."""
    free = shutil.disk_usage(folder).free
    return max(0, free - FREE_SPACE_MARGIN), (
        f"the free space of {folder} ({free:,} bytes) less a {FREE_SPACE_MARGIN:,}-byte margin; "
        "free some space or pass max_bytes")


def _too_compressed(size: int, packed: int, limits: _Limits) -> bool:
    return (limits.max_ratio is not None and size > RATIO_FLOOR
            and size / max(packed, 1) > limits.max_ratio)


def _shorten(name: str) -> str:
    return name if len(name) <= 80 else f"{name[:40]}...{name[-30:]}"


def _check_name(arc_name: str, rel: PurePosixPath, base_bytes: int) -> None:
    """Refuse names the file system would refuse (a clear message instead of an OSError later)."""
    try:
        parts = [os.fsencode(p) for p in rel.parts]
    except UnicodeError:
        raise UnsafeArchiveError(f"{arc_name}: member {_shorten(str(rel))!r} has a name that is not "
                                 "valid text") from None
    long = next((p for p in parts if len(p) > MAX_NAME_BYTES), None)
    if long is not None:
        raise UnsafeArchiveError(
            f"{arc_name}: member {_shorten(str(rel))!r} has a name component of {len(long)} bytes; "
            f"file systems allow {MAX_NAME_BYTES}")
    total = base_bytes + sum(len(p) + 1 for p in parts)
    if total > MAX_PATH_BYTES:
        raise UnsafeArchiveError(
            f"{arc_name}: member {_shorten(str(rel))!r} would make a path of {total} bytes; the "
            f"system allows {MAX_PATH_BYTES} (extract into a shorter folder?)")


class _Tree:
    """The files and folders an archive's members make; refuses duplicates and file/folder clashes."""

    def __init__(self, arc_name: str) -> None:
        self.arc_name, self.files, self.dirs = arc_name, set(), set()

    def add(self, rel: PurePosixPath, kind: str) -> None:
        where = f"{self.arc_name}: member {_shorten(str(rel))!r}"
        for parent in list(rel.parents)[:-1]:  # [:-1] drops "."
            if parent in self.files:
                raise UnsafeArchiveError(f"{where} needs {str(parent)!r} to be a folder, but an earlier "
                                         "member is a file of that name")
        if kind == "dir":
            if rel in self.files:
                raise UnsafeArchiveError(f"{where} is a folder, but an earlier member is a file of "
                                         "that name")
        elif rel in self.files:
            raise UnsafeArchiveError(f"{where} appears twice; refusing to pick one of the copies")
        elif rel in self.dirs:
            raise UnsafeArchiveError(f"{where} is a file, but earlier members make it a folder")
        (self.dirs if kind == "dir" else self.files).add(rel)
        self.dirs.update(list(rel.parents)[:-1])


def _check_members(arc_name: str, members, limits: _Limits, base_bytes: int) -> list:
    """Pass 1: every member is checked before a single byte is written; returns what to write."""
    plan, declared, tree = [], 0, _Tree(arc_name)
    for name, kind, size, ref in members:
        if len(plan) >= limits.max_files:
            raise UnsafeArchiveError(f"{arc_name} has more than {limits.max_files} members")
        if kind == "link":
            raise UnsafeArchiveError(f"{arc_name}: member {name!r} is a link; links are not extracted")
        if kind == "special":
            raise UnsafeArchiveError(f"{arc_name}: member {name!r} is a device/FIFO/special file")
        rel = _safe_relpath(name)
        if rel is None:
            continue
        _check_name(arc_name, rel, base_bytes)
        tree.add(rel, kind)
        size = max(0, int(size))
        declared += size
        if declared > limits.max_bytes:
            raise UnsafeArchiveError(f"{arc_name} would expand to more than {limits.max_bytes:,} bytes "
                                     f"(declared sizes; the cap is {limits.why})")
        packed = getattr(ref, "compress_size", None)  # zip members only; tar compresses as a whole
        if packed is not None and _too_compressed(size, packed, limits):
            raise UnsafeArchiveError(
                f"{arc_name}: member {_shorten(str(rel))!r} expands {size / max(packed, 1):,.0f}x "
                f"({packed:,} -> {size:,} bytes), above the {limits.max_ratio:g}x compression-ratio "
                "limit (a zip bomb?; max_ratio)")
        plan.append((rel, kind, ref))
    if _too_compressed(declared, limits.packed, limits):
        raise UnsafeArchiveError(
            f"{arc_name} would expand {declared / max(limits.packed, 1):,.0f}x ({limits.packed:,} -> "
            f"{declared:,} bytes), above the {limits.max_ratio:g}x compression-ratio limit "
            "(an archive bomb?; max_ratio)")
    return plan


def _write_members(arc, plan: list, tmp: Path, arc_name: str, limits: _Limits) -> None:
    """Pass 2: write the checked members into ``tmp``, counting the bytes actually written."""
    root, written = tmp.resolve(), 0
    for rel, kind, ref in plan:
        target = tmp.joinpath(*rel.parts)
        # Belt and braces: the resolved target must stay inside the temp folder.
        if root not in target.resolve().parents and target.resolve() != root:
            raise UnsafeArchiveError(f"{arc_name}: member {str(rel)!r} escapes the target")
        try:
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = arc.open(ref) if isinstance(arc, zipfile.ZipFile) else arc.extractfile(ref)
            if src is None:
                raise UnsafeArchiveError(f"{arc_name}: cannot read member {str(rel)!r}")
            with src, open(target, "xb") as out:
                while block := src.read(_CHUNK):
                    written += len(block)
                    if written > limits.max_bytes:
                        raise UnsafeArchiveError(f"{arc_name} expands to more than {limits.max_bytes:,} "
                                                 f"bytes (actual data; the cap is {limits.why})")
                    if _too_compressed(written, limits.packed, limits):
                        raise UnsafeArchiveError(
                            f"{arc_name} expands more than {limits.max_ratio:g}x (actual data: "
                            f"{written:,} bytes from {limits.packed:,}); compression-ratio limit, "
                            "max_ratio")
                    out.write(block)
        except OSError as exc:  # disk full, permissions, a name the file system refuses
            raise DownloadError(f"{arc_name}: cannot write member {_shorten(str(rel))!r}: "
                                f"{exc.strerror or exc}") from None


def safe_extract(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    max_bytes: int | None = None,
    max_files: int = DEFAULT_MAX_FILES,
    max_ratio: float | None = MAX_RATIO,
) -> Path:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into ``dest``, refusing anything unsafe.

    Refused (:class:`UnsafeArchiveError`, nothing is left behind): absolute paths, ``..``
    components, any symbolic or hard link, device files / FIFOs, a name twice, a name that is a
    file in one member and a folder in another, a name component over :data:`MAX_NAME_BYTES` or
    a path over :data:`MAX_PATH_BYTES` bytes, more than ``max_files`` members, more than
    ``max_bytes`` in total, and an expansion above ``max_ratio`` times the compressed size (the
    archive's, and each zip member's; only past :data:`RATIO_FLOOR` bytes). Sizes and ratios are
    checked against the declared sizes first and again against the bytes actually written (a
    lying header cannot get past). Everything is extracted into a temporary folder beside
    ``dest`` that is renamed to ``dest`` at the end, so ``dest`` appears complete or not at all;
    nothing outside it is touched.

    Args:
        archive: the archive file.
        dest: target folder; must not exist yet (or be empty).
        max_bytes: cap on the uncompressed size; None: the free space of the target's file
            system less :data:`FREE_SPACE_MARGIN`.
        max_files: cap on the number of members.
        max_ratio: cap on uncompressed / compressed size; None: no cap.

    Returns:
        ``dest`` as a Path.

    Raises:
        FileNotFoundError: no archive. FileExistsError: ``dest`` is a non-empty folder or a file.
        UnsafeArchiveError: see above. DownloadError: not a readable zip/tar archive, or a
        member cannot be written (disk full...).
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"extraction target {dest} already exists and is not an empty folder")
    if zipfile.is_zipfile(archive):
        opener, members_of = zipfile.ZipFile, _zip_members
    elif tarfile.is_tarfile(archive):
        opener, members_of = tarfile.open, _tar_members
    else:
        raise DownloadError(f"{archive.name} is not a zip or tar archive (a failed download? an HTML page?)")

    dest.parent.mkdir(parents=True, exist_ok=True)
    cap, why = (max_bytes, "max_bytes") if max_bytes is not None else _free_space_cap(dest.parent)
    limits = _Limits(cap, max_files, max_ratio, archive.stat().st_size, why)
    prefix = f".{dest.name}.extract-"
    base_bytes = len(os.fsencode(str(dest.parent.resolve() / prefix))) + 8  # + mkdtemp's suffix
    try:
        with opener(archive) as arc:
            plan = _check_members(archive.name, members_of(arc), limits, base_bytes)
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
            try:
                _write_members(arc, plan, tmp, archive.name, limits)
                if dest.exists():
                    dest.rmdir()  # empty (checked above)
                os.replace(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except (DownloadError, FileExistsError):
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, RuntimeError) as exc:
        # RuntimeError: zipfile's "encrypted member, password required".
        raise DownloadError(f"{archive.name} cannot be extracted: {exc}. Delete it and download again.") from None
    return dest


# --------------------------------------------------------------------------------------------
# Kaggle
# --------------------------------------------------------------------------------------------

def _manual_hint(info: DatasetInfo) -> str:
    return (f"Or download it by hand from {info.page}, unpack it, and pass the folder as DATASET "
            f"(e.g. --data /path/to/{info.name}).")


def _has_kaggle_credentials() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    cfg = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle")).expanduser()
    return (cfg / "kaggle.json").is_file() or KAGGLE_INPUT_ROOT.is_dir()


def _reachable(host: str, port: int, timeout: float = 10.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _kaggle_download(info: DatasetInfo, dest: Path) -> Path:
    """Default Kaggle downloader: kagglehub into ``dest`` (or kagglehub's cache if it is too old)."""
    try:
        import kagglehub  # optional dependency
    except ImportError:
        raise DownloadError(
            f"downloading {info.name} needs the optional package kagglehub: "
            "pip install 'covidlib[download]' (or pip install kagglehub). " + _manual_hint(info)
        ) from None
    host, port = _KAGGLE_PROBE
    if not _reachable(host, port):
        raise DownloadError(
            f"cannot reach {host} (offline, or a firewall/proxy blocks it), so {info.name} cannot be "
            "downloaded. " + _manual_hint(info)
        )
    creds = ("" if _has_kaggle_credentials() else
             " No Kaggle credentials were found: if the data set needs them, set KAGGLE_USERNAME and "
             "KAGGLE_KEY, or put kaggle.json (from kaggle.com > Settings > API) into ~/.kaggle/ "
             "(chmod 600); on Colab copy them from notebook secrets into those variables.")
    staging = dest.parent / f".{dest.name}.partial"
    try:
        params = inspect.signature(kagglehub.dataset_download).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        if "output_dir" in params:
            if staging.exists():
                shutil.rmtree(staging)  # our own leftover from an interrupted run
            dest.parent.mkdir(parents=True, exist_ok=True)
            got = Path(kagglehub.dataset_download(info.handle, output_dir=str(staging)))
            if got.resolve() == staging.resolve():
                os.replace(staging, dest)
                return dest
            return got
        # Older kagglehub: the files stay in its cache (~/.cache/kagglehub); use them from there.
        return Path(kagglehub.dataset_download(info.handle))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # kagglehub raises many types; report them all the same way
        msg = _scrub(f"{type(exc).__name__}: {exc}")
        raise DownloadError(
            f"kagglehub could not download {info.handle}: {msg}.{creds} " + _manual_hint(info)
        ) from None


def _https_dataset_download(info: DatasetInfo, dest: Path) -> Path:
    """Default downloader for https/github archives: download, extract (and inner archives)."""
    # The archive (and a resumable partial download) lives in the user cache, not beside the data.
    work = config.cache_dir() / "downloads" / info.name
    filename = Path(urllib.parse.urlsplit(info.handle).path).name or "archive"
    archive = download_https(info.handle, work / filename, sha256=info.sha256)
    staging = dest.parent / f".{dest.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover from an interrupted run
    safe_extract(archive, staging)
    for inner in info.archives_inside:
        inner_path = staging / inner
        if not inner_path.is_file():
            raise DownloadError(f"{info.name}: expected {inner} inside the archive; the source changed? "
                                + _manual_hint(info))
        name = inner_path.name
        for suffix in (".zip", ".tar.gz", ".tgz", ".tar"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        safe_extract(inner_path, inner_path.parent / name)
    os.replace(staging, dest)
    shutil.rmtree(work, ignore_errors=True)  # the archive; the data are in dest now
    return dest


# --------------------------------------------------------------------------------------------
# resolve
# --------------------------------------------------------------------------------------------

def _kaggle_input_copy(info: DatasetInfo) -> Path | None:
    if info.kind != "kaggle" or not KAGGLE_INPUT_ROOT.is_dir():
        return None
    owner = info.handle.split("/", 1)[0]
    for cand in (KAGGLE_INPUT_ROOT / info.slug,
                 KAGGLE_INPUT_ROOT / "datasets" / owner / info.slug,
                 KAGGLE_INPUT_ROOT / owner / info.slug):
        if cand.is_dir():
            return cand
    return None


def _nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def _dataset_info(text: str) -> DatasetInfo:
    """The registry entry for ``text``, or a bare entry for ``kaggle:<owner>/<slug>`` outside it."""
    if not text.lower().startswith("kaggle:") or text.lower().rstrip("/") in _lookup_table():
        return get_info(text)
    handle = text[len("kaggle:"):].strip().strip("/")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", handle):
        raise UnknownDatasetError(f"{text!r} is not a Kaggle handle of the form kaggle:<owner>/<slug>")
    return DatasetInfo(
        name=handle.split("/")[1], title=handle, kind="kaggle", handle=handle, licence=None,
        classes=(), label_map={}, modality="ct", expected_counts=None, expected_total=None,
        citation="", notes="not in the registry", page=f"https://www.kaggle.com/datasets/{handle}",
    )


def resolve(
    name_or_path: str | os.PathLike,
    dest: str | os.PathLike | None = None,
    *,
    downloader: Callable[[DatasetInfo, Path], str | os.PathLike] | None = None,
) -> Path:
    """Local folder holding a data set: a path as it is, an attached Kaggle copy, or a download.

    Args:
        name_or_path: an existing file/folder (a Colab Drive folder is one), a registry short name
            (``"sarscov2-ct"``), a Kaggle handle (``"plameneduardo/sarscov2-ctscan-dataset"``), or
            ``"kaggle:<owner>/<slug>"`` for a Kaggle data set outside the registry.
        dest: download target folder (default ``config.data_dir()/<short name>``). A non-empty
            ``dest`` is reused without downloading.
        downloader: ``f(info, dest) -> folder`` replacing the default (kagglehub / HTTPS); tests
            and custom mirrors use it.

    Returns:
        The folder (or file, for a local path) with the data.

    Raises:
        UnknownDatasetError: neither a path nor a registry entry (lists the known names).
        DownloadError: it could not be obtained; the message says what to do.
    """
    raw = os.fspath(name_or_path)
    local = Path(raw).expanduser()
    if local.exists():
        return local
    info = _dataset_info(str(raw).strip())
    attached = _kaggle_input_copy(info)
    if attached is not None:
        return attached
    target = Path(dest).expanduser() if dest is not None else config.data_dir() / info.name
    if _nonempty_dir(target):
        return target
    if downloader is None:
        if info.manual:
            raise DownloadError(
                f"{info.title} cannot be downloaded automatically (the source asks you to fetch it "
                f"yourself). Download it from {info.page}, unpack it, and pass the folder as DATASET "
                f"(or unpack it into {target})."
            )
        downloader = _kaggle_download if info.kind == "kaggle" else _https_dataset_download
    target.parent.mkdir(parents=True, exist_ok=True)
    got = downloader(info, target)
    out = Path(got) if got is not None else target
    if not out.exists():
        raise DownloadError(f"the downloader for {info.name} returned {out}, which does not exist")
    return out
