"""Tests of teachreg.data: manifest, fetching (against a local HTTP server), loaders, CLI.

No test reaches the network: real datasets come from the mirror at ../shared/data (relative to
the repository root), downloads from a server on 127.0.0.1, and any other connection fails.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import http.server
import importlib
import os
import socket
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from teachreg import cli, data

fetch_mod = importlib.import_module("teachreg.data.fetch")  # the name `fetch` is the function

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared" / "data"
needs_mirror = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no data mirror at {MIRROR}")

GOOD = bytes(range(256)) * 400  # 100 KiB
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """An empty cache in tmp_path and no mirror (conftest.py keeps every test off the network)."""
    monkeypatch.setenv("TEACHREG_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TEACHREG_DATA_MIRROR", raising=False)


@pytest.fixture(scope="session")
def mirror_cache(tmp_path_factory):
    """One cache for all tests that load real datasets, so they are copied once."""
    return tmp_path_factory.mktemp("teachreg-cache")


@pytest.fixture
def mirrored(monkeypatch, mirror_cache):
    if not MIRROR.is_dir():
        pytest.skip(f"no data mirror at {MIRROR}")
    monkeypatch.setenv("TEACHREG_DATA_MIRROR", str(MIRROR))
    monkeypatch.setenv("TEACHREG_DATA_DIR", str(mirror_cache))


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        _Handler.hits[self.path] = _Handler.hits.get(self.path, 0) + 1
        if self.path in ("/good", f"/mirror/sha256/{GOOD_SHA}"):
            body, length = GOOD, len(GOOD)
        elif self.path == "/corrupt":
            body, length = GOOD[::-1], len(GOOD)
        elif self.path == "/dropped":  # promise all the bytes, send half, hang up
            body, length = GOOD[: len(GOOD) // 2], len(GOOD)
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    """Base URL of an HTTP server on 127.0.0.1 (see _Handler for its paths)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def closed_url():
    """A URL on 127.0.0.1 where nothing listens: what a machine without network sees."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.bin"


@pytest.fixture
def tiny(monkeypatch):
    """Add a one-file dataset "tiny" whose URL the test chooses: tiny(url) -> FileEntry."""

    def make(url: str) -> data.FileEntry:
        entry = data.FileEntry(name="tiny/file.bin", url=url, sha256=GOOD_SHA, size=len(GOOD))
        ds = data.Dataset("tiny", "test data", "none", "none", (entry,))
        monkeypatch.setitem(data.manifest(), "tiny", ds)
        return entry

    return make


def cache_files() -> list[Path]:
    root = data.data_dir()
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- manifest and book page -------------------------------------------------------------------


@needs_mirror
def test_manifest_lists_every_source_file():
    with open(MIRROR / "SOURCES.tsv", newline="") as f:
        sources = {r["name"]: r for r in csv.DictReader(f, delimiter="\t")}
    files = {f.name: f for d in data.manifest().values() for f in d.files}
    assert files.keys() == sources.keys()
    for name, f in files.items():
        src = sources[name]
        assert (f.url, f.sha256, f.size) == (src["url"], src["sha256"], int(src["bytes"]))


def test_manifest_entries_are_complete():
    for d in data.manifest().values():
        assert d.description and d.license and d.citation and d.files
        for f in d.files:
            assert len(f.sha256) == 64 and f.size > 0
            commit = f.url.split("/raw/")[1].split("/")[0]
            assert len(commit) == 40, f"{f.url} is not pinned to a commit"


def test_book_page_is_up_to_date(capsys):
    page = (ROOT / "book" / "data.md").read_text(encoding="utf-8")
    assert page == data.manifest_markdown(), "run: teachreg data page > book/data.md"
    assert cli.main(["data", "page"]) == 0
    assert capsys.readouterr().out == page
    for name in data.manifest():
        assert f"## `{name}`" in page


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_dataset(capsys):
    for call in (data.fetch, data.load):
        with pytest.raises(data.UnknownDatasetError, match="known datasets: hnct, ") as err:
            call("hnct_typo")
        assert isinstance(err.value, LookupError) and isinstance(err.value, data.DataError)
    assert cli.main(["data", "fetch", "hnct_typo"]) == 1
    assert "unknown dataset 'hnct_typo'" in capsys.readouterr().err


def test_no_network_no_mirror(tiny, closed_url):
    tiny(closed_url)
    with pytest.raises(data.DownloadError) as err:
        data.fetch("tiny")
    message = str(err.value)
    for needed in (closed_url, "TEACHREG_DATA_MIRROR", "TEACHREG_DATA_DIR"):
        assert needed in message
    assert isinstance(err.value, ConnectionError)
    assert cache_files() == []


def test_http_404(tiny, server):
    tiny(f"{server}/missing")
    with pytest.raises(data.DownloadError, match="404"):
        data.fetch("tiny")
    assert cache_files() == []


def test_checksum_mismatch_is_not_kept(tiny, server):
    tiny(f"{server}/corrupt")
    with pytest.raises(data.ChecksumError, match=GOOD_SHA) as err:
        data.fetch("tiny")
    assert isinstance(err.value, ValueError)
    assert cache_files() == []


def test_dropped_download_leaves_nothing(tiny, server):
    tiny(f"{server}/dropped")
    with pytest.raises(data.DownloadError, match="/dropped: .*Connection broken"):
        data.fetch("tiny")
    assert cache_files() == []


def test_unwritable_cache_dir(tiny, server, tmp_path, monkeypatch):
    tiny(f"{server}/good")
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TEACHREG_DATA_DIR", str(tmp_path / "a_file" / "sub"))
    with pytest.raises(data.CacheError, match="TEACHREG_DATA_DIR") as err:
        data.fetch("tiny")
    assert isinstance(err.value, OSError)


# --- fetching -----------------------------------------------------------------------------------


def test_fetch_downloads_once(tiny, server):
    entry = tiny(f"{server}/good")
    hits = _Handler.hits.get("/good", 0)
    paths = data.fetch("tiny")
    assert paths == {entry.name: data.data_dir() / entry.name}
    assert paths[entry.name].read_bytes() == GOOD
    assert data.fetch("tiny") == paths
    assert _Handler.hits["/good"] == hits + 1
    assert cache_files() == [paths[entry.name]]
    assert data.is_cached("tiny")


def test_url_mirror_is_tried_first(tiny, server, monkeypatch):
    tiny(f"{server}/missing")
    monkeypatch.setenv("TEACHREG_DATA_MIRROR", f"{server}/mirror/")
    assert data.fetch("tiny")["tiny/file.bin"].read_bytes() == GOOD


def test_directory_mirror(tiny, closed_url, tmp_path, monkeypatch):
    tiny(closed_url)
    mirror = tmp_path / "mirror"
    (mirror / "sha256").mkdir(parents=True)
    (mirror / "sha256" / GOOD_SHA).write_bytes(GOOD)
    monkeypatch.setenv("TEACHREG_DATA_MIRROR", str(mirror))
    path = data.fetch("tiny")["tiny/file.bin"]
    assert path.read_bytes() == GOOD
    assert cache_files() == [path]  # no temporary file left behind


def test_corrupt_directory_mirror_falls_back_then_fails(tiny, server, tmp_path, monkeypatch):
    tiny(f"{server}/missing")
    mirror = tmp_path / "mirror"
    (mirror / "sha256").mkdir(parents=True)
    (mirror / "sha256" / GOOD_SHA).write_bytes(GOOD[:-1] + b"x")
    monkeypatch.setenv("TEACHREG_DATA_MIRROR", str(mirror))
    with pytest.raises(data.ChecksumError, match="mirror"):
        data.fetch("tiny")
    assert cache_files() == []


def test_corrupted_cache_is_found_and_replaced(tiny, server, capsys):
    tiny(f"{server}/good")
    path = data.fetch("tiny")["tiny/file.bin"]
    path.write_bytes(GOOD[: len(GOOD) // 3])  # truncated on disk
    assert data.verify(["tiny"]) == [path]
    assert cli.main(["data", "verify", "tiny"]) == 1
    assert f"BAD {path}" in capsys.readouterr().out
    assert data.fetch("tiny")["tiny/file.bin"].read_bytes() == GOOD
    assert data.verify(["tiny"]) == []
    assert cli.main(["data", "verify", "tiny"]) == 0


def test_cached_file_is_hashed_on_first_use(tiny, server, monkeypatch):
    tiny(f"{server}/good")
    path = data.fetch("tiny")["tiny/file.bin"]
    st = path.stat()
    path.write_bytes(GOOD[::-1])  # same size; then restore the timestamp too
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.setattr(fetch_mod, "_verified", {})  # as in a new process
    assert data.fetch("tiny")["tiny/file.bin"].read_bytes() == GOOD


# --- loaders (from the mirror) ------------------------------------------------------------------


def check_volume(vol, shape, spacing, label_names=()):
    assert vol.image.dtype == np.float32 and vol.image.shape == shape
    assert vol.image.flags.c_contiguous
    assert vol.spacing == pytest.approx(spacing, abs=1e-3)
    assert all(type(s) is float for s in vol.spacing)
    assert vol.label_names == label_names
    if label_names:
        assert vol.labels.dtype == np.uint8 and vol.labels.flags.c_contiguous
        assert vol.labels.shape == (*shape, len(label_names))
        assert set(np.unique(vol.labels)) == {0, 1}
        assert vol.labels.reshape(-1, len(label_names)).any(axis=0).all()
    else:
        assert vol.labels is None


def spine_is_posterior(vol):
    """Anterior at the top of vol[k]: bone (> 300 HU) mid-slice centroid below the middle row."""
    mid = vol.image[vol.image.shape[0] // 2]
    rows = np.nonzero(mid > 300)[0]
    return rows.mean() > mid.shape[0] / 2


def test_load_hnct(mirrored):
    vol = data.load("hnct")
    check_volume(vol, (37, 128, 128), (12.0, 4.0, 4.0), ("spinal_cord", "brainstem"))
    assert vol.image.min() == -1024
    z_cord, z_stem = (np.nonzero(vol.labels[..., c])[0].mean() for c in (0, 1))
    assert z_stem > z_cord  # z runs inferior to superior
    rows = np.nonzero(vol.image[-1] > -500)[0]  # above the head only the couch is left,
    assert rows.mean() > 96  # at the bottom (posterior) of the slice


def test_load_prostate_mr(mirrored):
    pair = data.load("prostate_mr")
    assert isinstance(pair, data.Pair)
    for vol in (pair.moving, pair.fixed):
        check_volume(vol, (32, 128, 128), (1.0, 1.0, 1.0), ("prostate",))
    assert pair.moving.name.endswith("image0") and pair.fixed.name.endswith("image1")


@pytest.mark.parametrize("split, case", [("train", 1), ("test", 12)])
def test_load_lung_masks(mirrored, split, case):
    pair = data.load("lung_masks", case=case, split=split)
    for vol in (pair.moving, pair.fixed):
        check_volume(vol, (208, 192, 192), (1.75, 1.25, 1.75), ("lung",))
        assert np.array_equal(vol.image, vol.labels[..., 0])
    assert "moving" in pair.moving.name and "fixed" in pair.fixed.name
    assert pair.moving.labels.sum() < pair.fixed.labels.sum()  # expiration: smaller lungs


def test_load_lung_masks_unknown_case(mirrored):
    with pytest.raises(data.DataError, match=r"train cases: \[1, 2, 3"):
        data.load("lung_masks", case=8)


def test_load_l2r_case001(mirrored):
    vol = data.load("chest_ct_l2r_case001")
    check_volume(vol, (208, 192, 192), (1.75, 1.25, 1.75), ("lung",))
    assert vol.image.min() == -1000
    assert np.median(vol.image[vol.labels[..., 0] == 1]) < -500  # the mask lies on the lungs
    assert spine_is_posterior(vol)


def test_load_dynagan(mirrored):
    vol = data.load("chest_ct_dynagan_0103")
    check_volume(vol, (128, 128, 128), (2.315, 1.984, 2.157))
    assert vol.image.min() == -1000
    assert spine_is_posterior(vol)


def test_load_cip(mirrored):
    ct, test_input = data.load("chest_ct_cip")
    check_volume(ct, (79, 64, 64), (3.987, 4.172, 4.172), ("lung", "right_lung", "left_lung"))
    check_volume(test_input, (50, 64, 64), (6.99, 5.281, 5.281))
    lung, right, left = (ct.labels[..., c].astype(bool) for c in range(3))
    assert np.array_equal(lung, right | left) and not (right & left).any()
    # x runs from the patient's right to left
    assert np.nonzero(right)[2].mean() < np.nonzero(left)[2].mean()
    assert spine_is_posterior(ct) and spine_is_posterior(test_input)


@pytest.mark.parametrize(
    "name, shape, spacing",
    [
        ("chest_ct_cptac", (99, 512, 512), (3.0, 0.564453125, 0.564453125)),
        ("chest_ct_itkelastix", (141, 512, 512), (2.0, 0.9765625, 0.9765625)),
        ("chest_ct_lidc_0314", (138, 512, 512), (2.0, 0.78125, 0.78125)),
        ("chest_ct_lungdx_a0001", (64, 512, 512), (5.0, 0.841796875, 0.841796875)),
        ("chest_ct_lungdx_a0002", (30, 512, 512), (8.0, 0.646484375, 0.646484375)),
    ],
)
def test_load_dicom(mirrored, name, shape, spacing):
    vol = data.load(name)
    check_volume(vol, shape, spacing)
    assert vol.image.min() in (-1024, -1000)  # RescaleIntercept applied: air
    assert spine_is_posterior(vol)


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_list_fetch_verify(mirrored, capsys):
    assert cli.main(["data", "fetch", "hnct", "chest_ct_cip"]) == 0
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in data.manifest():
        assert name in out
    assert any(line.startswith("hnct ") and " yes " in line for line in out.splitlines())
    assert cli.main(["data", "verify"]) == 0


# --- reliability --------------------------------------------------------------------------------

loaders_mod = importlib.import_module("teachreg.data.loaders")


def write_ct_slice(path: Path, series_uid: str, description: str, z: float) -> None:
    """A 4x4 CT slice at height ``z`` mm of series ``series_uid``, saved as a DICOM file."""
    import pydicom

    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SeriesInstanceUID, ds.SeriesDescription = series_uid, description
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    ds.PixelSpacing = [0.5, 0.5]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.full((4, 4), 1000 + z, np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def dicom_folder(folder: Path, series: dict[str, tuple[str, list[float]]]) -> list[Path]:
    """Slices of each series {uid: (description, heights)} interleaved in one folder, + a README."""
    folder.mkdir()
    for uid, (description, heights) in series.items():
        for z in heights:
            write_ct_slice(folder / f"IM{z * 10:04.0f}.dcm", uid, description, z)
    (folder / "README.txt").write_text("exported from the PACS\n")
    return sorted(folder.iterdir())


def test_dicom_folder_with_two_series_is_refused(tmp_path):
    paths = dicom_folder(tmp_path / "ct", {
        "1.2.3.1": ("CHEST 3mm", [0.0, 3.0, 6.0]),
        "1.2.3.2": ("CHEST 1.5mm", [1.5, 4.5, 7.5, 10.5]),
    })
    with pytest.warns(UserWarning, match="README.txt"):
        with pytest.raises(data.DataError) as err:
            loaders_mod.read_dicom_series(paths)
    message = str(err.value)
    for needed in (str(tmp_path / "ct"), "2 DICOM series", "1.2.3.1", "CHEST 3mm", "3 slices",
                   "1.2.3.2", "CHEST 1.5mm", "4 slices", "a folder of its own"):
        assert needed in message
    assert "uneven" not in message


def test_dicom_folder_skips_files_that_are_not_dicom(tmp_path):
    paths = dicom_folder(tmp_path / "ct", {"1.2.3.1": ("CHEST 3mm", [6.0, 0.0, 3.0])})
    with pytest.warns(UserWarning, match=r"ct: skipped 1 file\(s\) .*: README\.txt$"):
        image, spacing = loaders_mod.read_dicom_series(paths)
    assert image.shape == (3, 4, 4) and spacing == pytest.approx((3.0, 0.5, 0.5))
    assert image[:, 0, 0].tolist() == [1000 - 1024, 1003 - 1024, 1006 - 1024]  # sorted by z


def cut_off(monkeypatch, exc: BaseException) -> list[list[Path]]:
    """HTTP downloads get half the body, then ``exc`` (a full disk, Ctrl-C) is raised.

    Returns a list that gets the cache's files as they were when ``exc`` was raised.
    """
    import requests

    seen: list[list[Path]] = []

    def iter_content(self, chunk_size=1, decode_unicode=False):
        yield GOOD[: len(GOOD) // 2]
        seen.append(cache_files())
        raise exc

    monkeypatch.setattr(requests.models.Response, "iter_content", iter_content)
    return seen


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def assert_disk_full_message(message: str) -> None:
    for needed in ("disk is full", str(data.data_dir() / "tiny"), "Free", "TEACHREG_DATA_DIR"):
        assert needed in message
    assert "network" not in message


def test_disk_full_with_a_directory_mirror(tiny, closed_url, tmp_path, monkeypatch):
    tiny(closed_url)
    mirror = tmp_path / "mirror"
    (mirror / "sha256").mkdir(parents=True)
    (mirror / "sha256" / GOOD_SHA).write_bytes(GOOD)
    monkeypatch.setenv("TEACHREG_DATA_MIRROR", str(mirror))
    seen = []

    def copyfileobj(src, dst, length=0):
        dst.write(src.read(1000))
        dst.flush()
        seen.append(cache_files())
        raise disk_full()

    monkeypatch.setattr(fetch_mod.shutil, "copyfileobj", copyfileobj)
    with pytest.raises(data.CacheError) as err:
        data.fetch("tiny")
    assert_disk_full_message(str(err.value))
    assert len(seen[0]) == 1 and cache_files() == []  # the partial file was removed


def test_disk_full_with_a_url_mirror(tiny, server, monkeypatch, capsys):
    tiny(f"{server}/good")
    monkeypatch.setenv("TEACHREG_DATA_MIRROR", f"{server}/mirror/")
    seen = cut_off(monkeypatch, disk_full())
    assert cli.main(["data", "fetch", "tiny"]) == 1
    assert_disk_full_message(capsys.readouterr().err)
    assert len(seen) == 1 and len(seen[0]) == 1 and cache_files() == []


def test_interrupted_fetch(tiny, server, monkeypatch, capsys):
    tiny(f"{server}/good")
    seen = cut_off(monkeypatch, KeyboardInterrupt())
    assert cli.main(["data", "fetch", "tiny"]) == 130
    err = capsys.readouterr().err  # after the download's progress bar
    assert err.endswith("teachreg: interrupted\n") and "Traceback" not in err
    assert len(seen[0]) == 1 and cache_files() == []  # the partial download was removed


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_cached_files_get_the_umask_permissions(tiny, server, tmp_path, monkeypatch, umask):
    tiny(f"{server}/good")
    mirror = tmp_path / "mirror"
    (mirror / "sha256").mkdir(parents=True)
    (mirror / "sha256" / GOOD_SHA).write_bytes(GOOD)
    old = os.umask(umask)
    try:
        downloaded = data.fetch("tiny")["tiny/file.bin"]
        mode_downloaded = stat.S_IMODE(downloaded.stat().st_mode)
        downloaded.unlink()
        monkeypatch.setenv("TEACHREG_DATA_MIRROR", str(mirror))
        copied = data.fetch("tiny")["tiny/file.bin"]
        mode_copied = stat.S_IMODE(copied.stat().st_mode)
    finally:
        os.umask(old)
    assert mode_downloaded == mode_copied == 0o666 & ~umask


def test_verify_removes_leftover_temporary_files(tiny, server, capsys):
    tiny(f"{server}/good")
    path = data.fetch("tiny")["tiny/file.bin"]
    folder = path.parent
    hour_ago = time.time() - 3600
    leftovers = [folder / ".file.bin.0123456789abcdef.part", folder / "tmpa1b2_c3d"]
    others = [folder / "tmp_notes.txt", folder / "notes.part", folder / "tmpabc"]
    in_progress = folder / ".file.bin.fedcba9876543210.part"  # another process is downloading
    for p in leftovers + others + [in_progress]:
        p.write_bytes(b"partial")
    for p in leftovers + others:
        os.utime(p, (hour_ago, hour_ago))
    assert cli.main(["data", "verify", "tiny"]) == 0
    out = capsys.readouterr().out
    for p in leftovers:
        assert f"removed {p}" in out and not p.exists()
    for p in others + [in_progress]:
        assert str(p) not in out and p.exists()
    assert "all cached files match" in out


def test_directory_in_place_of_a_cached_file(tiny, server, capsys):
    tiny(f"{server}/good")
    path = data.data_dir() / "tiny" / "file.bin"
    (path / "inside").mkdir(parents=True)
    assert data.verify(["tiny"]) == [path]
    assert cli.main(["data", "verify", "tiny"]) == 1
    assert f"BAD {path}: a directory" in capsys.readouterr().out
    with pytest.raises(data.CacheError, match="directory") as err:
        data.fetch("tiny")
    assert str(path) in str(err.value) and "TEACHREG_DATA_DIR" in str(err.value)
    assert (path / "inside").is_dir()  # not deleted


def test_verify_says_what_is_not_cached(tiny, server, capsys):
    tiny(f"{server}/good")
    assert cli.main(["data", "verify"]) == 0
    out = capsys.readouterr().out
    assert "nothing is cached" in out and str(data.data_dir()) in out
    assert "match" not in out
    data.fetch("tiny")
    assert cli.main(["data", "verify", "tiny", "hnct"]) == 0
    out = capsys.readouterr().out
    assert "not cached: hnct" in out and "tiny" not in out.split("not cached")[1]
    assert "all cached files match" in out
