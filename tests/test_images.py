"""Tests for covidlib.images: every file is written by the test itself into tmp_path."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

# covidlib before cv2: OpenCV reads its pixel cap (covidlib's 2**27) once, when cv2 is loaded.
from covidlib import images as cimg  # isort: skip
import cv2  # noqa: E402  isort: skip

try:
    from malformed import (MALFORMED_EXPECTATIONS, MALFORMED_REASONS, MALFORMED_VOLUMES, tree_snapshot,
                           write_ct_dicom, write_image, write_malformed_corpus, write_nifti)
except ImportError:  # tests/ turned into a package
    from tests.malformed import (MALFORMED_EXPECTATIONS, MALFORMED_REASONS, MALFORMED_VOLUMES,
                                 tree_snapshot, write_ct_dicom, write_image, write_malformed_corpus,
                                 write_nifti)


def gradient(h: int = 40, w: int = 50, dtype=np.uint8) -> np.ndarray:
    top = 255 if dtype == np.uint8 else 60000
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * 3 + yy * 2) % (top + 1)).astype(dtype)


def lung_window(hu):
    return np.clip(np.rint((np.asarray(hu, float) + 1350.0) / 1500.0 * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- raster formats


def test_png_8bit_roundtrip(tmp_path):
    img = gradient()
    out = cimg.read_image(write_image(tmp_path / "a.png", img))
    assert out.dtype == np.uint8 and out.ndim == 2
    np.testing.assert_array_equal(out, img)


def test_png_16bit_keeps_uint16(tmp_path):
    img = (gradient(dtype=np.uint16).astype(np.uint32) * 37 % 65536).astype(np.uint16)
    out = cimg.read_image(write_image(tmp_path / "a16.png", img))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, img)


def test_tiff_16bit(tmp_path):
    img = (gradient(dtype=np.uint16).astype(np.uint32) * 1000 % 65536).astype(np.uint16)
    out = cimg.read_image(write_image(tmp_path / "a.tif", img))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, img)


def test_rgb_and_rgba_become_gray(tmp_path):
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    expected = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    out = cimg.read_image(write_image(tmp_path / "rgb.png", bgr))
    assert out.shape == (30, 20) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    bgra = np.dstack([bgr, np.full((30, 20), 7, np.uint8)])  # alpha must not leak into gray
    out = cimg.read_image(write_image(tmp_path / "rgba.png", bgra))
    np.testing.assert_array_equal(out, expected)


def test_jpeg_and_bmp(tmp_path):
    img = cv2.GaussianBlur(gradient(64, 64), (5, 5), 0)
    out = cimg.read_image(write_image(tmp_path / "a.jpg", np.dstack([img] * 3)))
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < 3
    np.testing.assert_array_equal(cimg.read_image(write_image(tmp_path / "a.bmp", img)), img)


def test_non_ascii_and_space_path(tmp_path):
    img = gradient()
    p = write_image(tmp_path / "Bilder ü" / "Röntgen 图像 1.png", img)
    np.testing.assert_array_equal(cimg.read_image(p), img)
    keys = [k for k, _ in cimg.iter_images(tmp_path)]
    assert keys == ["Bilder ü/Röntgen 图像 1.png"]


def test_wrong_extension_reads_by_content(tmp_path):
    img = gradient()
    p = tmp_path / "really_a_png.bmp"
    p.write_bytes(cv2.imencode(".png", img)[1].tobytes())
    np.testing.assert_array_equal(cimg.read_image(p), img)


def test_to_uint8():
    a = np.array([[1000, 2000], [3000, 5000]], np.uint16)
    out = cimg.to_uint8(a)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert out[0, 1] == round(1000 / 4000 * 255)
    u = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert cimg.to_uint8(u) is u
    np.testing.assert_array_equal(cimg.to_uint8(np.full((2, 2), 9, np.uint16)), 0)
    f = cimg.to_uint8(np.array([0.0, np.nan, 1.0]))
    assert f.tolist() == [0, 0, 255]


def test_image_problem():
    assert cimg.image_problem(np.zeros((64, 64), np.uint8)).startswith("blank")
    assert cimg.image_problem(np.full((1, 1), 5, np.uint8)).startswith("image too small")
    assert cimg.image_problem(gradient()) is None


# --------------------------------------------------------------------------- DICOM


HU = np.array([[-2000, -1350, -1000, -600], [0, 40, 150, 1000]], dtype=float)


def test_dicom_ct_hu_windowing(tmp_path):
    # slope 2 / intercept -2048: stored values differ from HU, so the rescale must be applied.
    p = write_ct_dicom(tmp_path / "ct.dcm", HU, slope=2.0, intercept=-2048.0)
    out = cimg.read_dicom(p)
    assert out.dtype == np.uint8 and out.shape == HU.shape
    np.testing.assert_array_equal(out, lung_window(HU))
    assert out[0, 1] == 0 and out[1, 2] == 255 and out[0, 3] == 128  # -1350 / 150 / -600 (centre)
    # read_image delegates .dcm files to read_dicom with the lung window
    np.testing.assert_array_equal(cimg.read_image(p), out)


def test_dicom_window_presets_and_tuple(tmp_path):
    p = write_ct_dicom(tmp_path / "ct.dcm", HU)
    med = cimg.read_dicom(p, window="mediastinum")  # 40 / 400 -> [-160, 240]
    exp = np.clip(np.rint((HU + 160) / 400 * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(med, exp)
    np.testing.assert_array_equal(cimg.read_dicom(p, window=(40, 400)), exp)
    np.testing.assert_array_equal(cimg.read_dicom(p, window="bone"),
                                  np.clip(np.rint((HU + 500) / 1800 * 255), 0, 255).astype(np.uint8))
    with pytest.raises(ValueError, match="unknown window"):
        cimg.read_dicom(p, window="brain")
    with pytest.raises(ValueError, match="width"):
        cimg.read_dicom(p, window=(0, 0))


def test_dicom_monochrome1_inverted(tmp_path):
    m2 = cimg.read_dicom(write_ct_dicom(tmp_path / "m2.dcm", HU))
    m1 = cimg.read_dicom(write_ct_dicom(tmp_path / "m1.dcm", HU, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(m1, 255 - m2)


def test_dicom_xray_minmax(tmp_path):
    stored = np.array([[100, 180], [260, 500]], float)
    # DX with no rescale: values are not HU -> min-max to 0..255
    p = write_ct_dicom(tmp_path / "dx.dcm", stored, intercept=0.0, modality="DX")
    out = cimg.read_dicom(p)
    assert out.tolist() == [[0, 51], [102, 255]]
    p1 = write_ct_dicom(tmp_path / "dx1.dcm", stored, intercept=0.0, modality="DX", photometric="MONOCHROME1")
    assert cimg.read_dicom(p1).tolist() == [[255, 204], [153, 0]]


def test_dicom_series_sorted_by_position(tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.1"
    # File names and instance numbers disagree with the anatomy on purpose.
    for name, z, inst, hu in (("10.dcm", 10.0, 1, 150.0), ("2.dcm", -5.0, 3, -1350.0), ("1.dcm", 2.5, 2, -600.0)):
        write_ct_dicom(tmp_path / "series" / name, np.full((4, 4), hu), z=z, instance=inst, series_uid=uid)
    got = cimg.read_dicom_series(tmp_path / "series")
    assert [k for k, _ in got] == ["2.dcm", "1.dcm", "10.dcm"]
    assert [int(s[0, 0]) for _, s in got] == [0, 128, 255]
    keys = [k for k, _ in cimg.iter_images(tmp_path)]
    assert keys == ["series/2.dcm", "series/1.dcm", "series/10.dcm"]


def test_dicom_series_instance_number_fallback(tmp_path):
    from pydicom import dcmread

    for name, inst, hu in (("a.dcm", 3, 150.0), ("b.dcm", 1, -1350.0), ("c.dcm", 2, -600.0)):
        p = write_ct_dicom(tmp_path / "s" / name, np.full((4, 4), hu), instance=inst, series_uid="1.2.3")
        ds = dcmread(p)
        del ds.ImagePositionPatient
        ds.save_as(p)
    assert [k for k, _ in cimg.read_dicom_series(tmp_path / "s")] == ["b.dcm", "c.dcm", "a.dcm"]


def test_dicom_series_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        cimg.read_dicom_series(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DICOM"):
        cimg.read_dicom_series(tmp_path / "empty")


# --------------------------------------------------------------------------- NIfTI


def test_nifti_volume_slices_orientation_windowing(tmp_path):
    X, Y, Z = 20, 24, 5
    vol = np.full((X, Y, Z), -1000.0)
    vol[X - 2, Y - 2, 1] = 150.0  # identity affine (RAS): high x = patient's right, high y = anterior
    vol[1, 1, 3] = -1350.0  # patient's left, posterior
    slices = cimg.read_volume(write_nifti(tmp_path / "v.nii.gz", vol))
    assert len(slices) == Z
    s = slices[1]
    assert s.shape == (Y, X) and s.dtype == np.uint8
    assert s[1, 1] == 255  # right-anterior voxel -> top-left (patient's right on viewer's left)
    assert s[0, 0] == lung_window(-1000)
    b = slices[3]
    assert b[Y - 2, X - 2] == 0  # left-posterior voxel -> bottom-right


def test_nifti_reoriented_from_lps_and_flipped_z(tmp_path):
    X, Y, Z = 16, 12, 4
    vol = np.full((X, Y, Z), -1000.0)
    vol[0, 0, 0] = 150.0  # affine diag(-1,-1,-1): voxel (0,0,0) is right, anterior, superior-most
    aff = np.diag([-1.0, -1.0, -2.0, 1.0])
    slices = cimg.read_volume(write_nifti(tmp_path / "lps.nii", vol, aff))
    assert len(slices) == Z
    assert slices[-1][0, 0] == 255  # superior-most = last slice (feet -> head), right-anterior = top-left
    assert all(s.max() == lung_window(-1000) for s in slices[:-1])


def test_nifti_not_hu_warns_and_scales(tmp_path):
    vol = np.zeros((8, 8, 2))
    vol[2, 3, 0] = 200.0
    with pytest.warns(UserWarning, match="not in Hounsfield"):
        slices = cimg.read_volume(write_nifti(tmp_path / "u8.nii.gz", vol))
    assert max(s.max() for s in slices) == 255


def test_nifti_via_read_image_points_to_read_volume(tmp_path):
    p = write_nifti(tmp_path / "v.nii.gz", np.zeros((4, 4, 3)))
    with pytest.raises(cimg.ImageReadError, match="read_volume"):
        cimg.read_image(p)
    with pytest.warns(UserWarning):
        keys = [k for k, _ in cimg.iter_images(p)]
    assert keys == ["v.nii.gz#z0000", "v.nii.gz#z0001", "v.nii.gz#z0002"]


# --------------------------------------------------------------------------- errors


def test_missing_file_is_also_filenotfounderror(tmp_path):
    with pytest.raises(FileNotFoundError):
        cimg.read_image(tmp_path / "nope.png")
    with pytest.raises(cimg.ImageReadError) as ei:
        cimg.read_image(tmp_path / "nope.png")
    assert ei.value.reason == "file not found" and ei.value.path.name == "nope.png"


def test_unsupported_extension(tmp_path):
    p = tmp_path / "scan.xyz"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(cimg.ImageReadError, match="unsupported file type"):
        cimg.read_image(p)


def test_malformed_corpus(tmp_path):
    folder = tmp_path / "corpus ü"
    paths = write_malformed_corpus(folder)
    assert len(paths) >= 15
    before = tree_snapshot(folder)
    for p in paths:
        expected = MALFORMED_EXPECTATIONS[p.name]
        if expected == "error":
            with pytest.raises(cimg.ImageReadError) as ei:
                cimg.read_image(p)
            assert isinstance(ei.value, ValueError)
            assert ei.value.reason and ei.value.path == p
            assert str(p) in str(ei.value)
        else:
            img = cimg.read_image(p)
            assert img.ndim == 2
            problem = cimg.image_problem(img)
            assert (problem is None) == (expected == "ok"), (p.name, problem)
    for name in ("corrupt.nii.gz", "empty.nii"):
        with pytest.raises(cimg.ImageReadError):
            cimg.read_volume(folder / name)
    # iter_images over the corpus: warns for each bad file, never raises, yields only the readable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for k, _ in cimg.iter_images(folder)]
    assert set(keys) == {"tiny_1x1.png", "tiny_1x4000.png", "all_black.png", "png_named.bmp"}
    assert len(caught) >= 10
    with pytest.raises(cimg.ImageReadError):
        list(cimg.iter_images(folder, errors="raise"))
    assert tree_snapshot(folder) == before


def test_specific_reasons(tmp_path):
    folder = tmp_path / "c"
    write_malformed_corpus(folder)

    def reason(name):
        with pytest.raises(cimg.ImageReadError) as ei:
            cimg.read_image(folder / name)
        return ei.value.reason

    assert reason("empty.png").startswith("empty file")
    assert "truncated" in reason("truncated.png")
    assert "truncated" in reason("truncated.jpg")
    assert "HTML" in reason("html_error_page.png")
    assert "text" in reason("text_file.jpg")
    assert "exceed" in reason("bomb_100000x100000.png")
    assert "folder" in reason("folder_named_like.png")
    assert "no pixel data" in reason("dicom_no_pixels.dcm")
    assert "not a DICOM" in reason("not_dicom.dcm")
    assert "broken symbolic link" in reason("broken_link.png")


def test_every_format_is_capped_from_its_header_and_the_reason_names_it(tmp_path):
    """Issue #13: BigTIFF, a TIFF whose IFD sits past 64 kB, RLE DICOM and NIfTI were decoded
    whatever size their header declared; a truncated JPEG with its end marker back decoded to
    half gray. Each is refused before decoding, with the declared size in the reason."""
    import re
    import tracemalloc

    folder = tmp_path / "c"
    write_malformed_corpus(folder)
    before = tree_snapshot(folder)
    tracemalloc.start()
    try:
        for name, pattern in MALFORMED_REASONS.items():
            p = folder / name
            try:
                if name in MALFORMED_VOLUMES:
                    cimg.read_volume(p)
                    got = None
                else:
                    got = cimg.image_problem(cimg.read_image(p))
            except cimg.ImageReadError as e:
                got = e.reason
                assert str(p) in str(e)  # the message names the file
            assert got is not None and re.search(pattern, got), (name, got)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak  # nothing was decoded (numpy allocations are traced)
    assert tree_snapshot(folder) == before


def _png_header_bomb(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height 8-bit gray pixels; its data is a few bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


_CAP_PROBE = """
import sys
{first}
from covidlib import images
import cv2
try:
    images.read_image(sys.argv[1])
    print(images.MAX_IMAGE_PIXELS, "decoded")
except images.ImageReadError as e:
    print(images.MAX_IMAGE_PIXELS, e.reason)
"""


def _probe_cap(path, first: str = "", env: dict | None = None) -> str:
    """Read ``path`` in a fresh interpreter (OpenCV's cap is fixed when cv2 loads)."""
    run_env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    run_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", _CAP_PROBE.format(first=first), str(path)],
                         capture_output=True, text=True, env=run_env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_pixel_cap_is_opencvs_own_and_covidlib_sets_it(tmp_path):
    """Between covidlib's cap (2**27) and OpenCV's default (2**30): refused from the header,
    before decoding, wherever covidlib loads cv2; MAX_IMAGE_PIXELS reports the cap in force."""
    bomb = tmp_path / "bomb_12000x12000.png"
    bomb.write_bytes(_png_header_bomb(12000, 12000))  # 144 Mpx
    cap, reason = _probe_cap(bomb).split(" ", 1)
    assert int(cap) == cimg.MAX_IMAGE_PIXELS == 2**27
    assert reason.startswith("image dimensions exceed the cap of 134,217,728 pixels (OPENCV_IO_MAX_IMAGE_PIXELS")
    # cv2 loaded first: OpenCV keeps its default (the file is decoded: its data is short)
    cap, reason = _probe_cap(bomb, first="import cv2").split(" ", 1)
    assert int(cap) == 2**30 and "exceed the cap" not in reason
    # the user's own setting wins, in OpenCV's notation
    small = write_image(tmp_path / "small.png", gradient(40, 50))
    assert _probe_cap(small, env={"OPENCV_IO_MAX_IMAGE_PIXELS": "1000"}).startswith("1000 image dimensions exceed")
    assert _probe_cap(small, env={"OPENCV_IO_MAX_IMAGE_PIXELS": "2Kb"}) == "2048 decoded"


def test_importing_covidlib_sets_the_cap_before_anything_loads_cv2():
    """In a notebook kernel covidlib's __init__ imports TensorFlow, which loads cv2: the cap must
    be in the environment before that, i.e. set by the package itself, not by covidlib.images."""
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    code = "import os, sys, covidlib; print('cv2' in sys.modules, os.environ.get('OPENCV_IO_MAX_IMAGE_PIXELS'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["False", str(2**27)], out.stdout + out.stderr[-2000:]


def test_dicom_preamble_under_an_image_name_reads_as_dicom(tmp_path):
    p = write_ct_dicom(tmp_path / "ct.dcm", HU)
    disguised = tmp_path / "scan.png"
    disguised.write_bytes(p.read_bytes())
    np.testing.assert_array_equal(cimg.read_image(disguised), lung_window(HU))


def test_any_format_opencv_decodes_reads_by_content(tmp_path):
    img = gradient()
    p = tmp_path / "really_webp.png"
    p.write_bytes(cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes())  # lossless
    np.testing.assert_array_equal(cimg.read_image(p), img)


def test_jpeg_gray_fill_check_leaves_real_jpegs_alone(tmp_path):
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(17, 23), (64, 64), (128, 96), (8, 200)]):
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w), dtype=np.uint8), (5, 5), 0)
        p = tmp_path / f"ok{i}.jpg"
        p.write_bytes(cv2.imencode(".jpg", img)[1].tobytes())
        assert cimg.read_image(p).shape == (h, w)
    dark = np.zeros((64, 64), np.uint8)  # black padding at the bottom is a scan, not a fill
    dark[:40] = rng.integers(0, 256, (40, 64))
    p = tmp_path / "padded.jpg"
    p.write_bytes(cv2.imencode(".jpg", dark)[1].tobytes())
    assert cimg.read_image(p).shape == (64, 64)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    # read_image opens the file itself: a pipe must be reported, not waited on for a writer
    p = tmp_path / "pipe.png"
    os.mkfifo(p)
    with pytest.raises(cimg.ImageReadError, match="not a regular file"):
        cimg.read_image(p)


def test_colour_jpeg_decodes_to_the_same_gray_as_a_colour_decode(tmp_path):
    # read_image decodes JPEG straight to luma; it must agree with decode-to-BGR + cvtColor
    rng = np.random.default_rng(1)
    bgr = cv2.GaussianBlur(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8), (7, 7), 0)
    p = tmp_path / "colour.jpg"
    p.write_bytes(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    expected = cv2.cvtColor(cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2GRAY)
    out = cimg.read_image(p)
    assert out.shape == (96, 80) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - expected).max() <= 1


@pytest.mark.skipif(not hasattr(__import__("socket"), "AF_UNIX"), reason="no Unix sockets")
def test_socket_named_like_an_image_is_not_a_regular_file(tmp_path):
    import socket

    p = tmp_path / "sock.png"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(p))
        with pytest.raises(cimg.ImageReadError, match="not a regular file"):
            cimg.read_image(p)
    finally:
        s.close()
