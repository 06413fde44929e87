"""DCT-domain denoising (step ``dct`` of :mod:`covidlib.enhance`).

* :func:`dct_denoise` -- a real DCT-domain denoiser (overlapping 8x8 blocks, hard threshold at
  3 sigma; Yu & Sapiro, IPOL 2011). The seed's "DCT" step was ``idct(dct(x))``: an identity.
* :func:`estimate_sigma` -- the noise level it thresholds at by default.

Only numpy and OpenCV are imported here (threadpoolctl lazily).
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator

import cv2
import numpy as np

from covidlib.crop import _check_image

__all__ = ["estimate_sigma", "dct_denoise"]


# --------------------------------------------------------------------------------------------
# DCT denoising (Yu & Sapiro 2011)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``D @ x`` is the DCT of a length-n vector, ``D.T @ c`` inverts."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    d = d.astype(np.float32)
    d.setflags(write=False)
    return d


_BLAS_LIBS: Any = None
_WORKSPACE = threading.local()
_WORKSPACE_KEEP = 1 << 22  # 4 Mi float32 = 16 MB per buffer (a 2k x 2k image)


def _blas_libs() -> list:
    global _BLAS_LIBS
    if _BLAS_LIBS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS_LIBS = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # threadpoolctl absent or broken: run as is
            _BLAS_LIBS = []
    return _BLAS_LIBS


@contextmanager
def _single_thread_blas() -> Iterator[None]:
    """Keep BLAS on one thread: the 8x8 products are far too small to gain from threads, and
    OpenBLAS threads spinning next to other processes (or our own workers) cost 10x.

    Talks to the BLAS libraries directly (one C call each) rather than through
    ``threadpool_limits``, which rescans the loaded libraries on every call: a noticeable share
    of one image's denoising."""
    libs = _blas_libs()
    before = [lib.get_num_threads() for lib in libs]
    for lib, n in zip(libs, before):
        if n != 1:
            lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, before):
            if n != 1:
                lib.set_num_threads(n)


def _workspace(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A reusable float32 scratch array of ``shape`` (per thread, grown on demand).

    Fresh multi-hundred-kB temporaries per operation made the denoiser several times slower than
    its arithmetic (allocation, page faults, cache misses); each buffer is now allocated once per
    thread and reused for every image. Buffers above ``_WORKSPACE_KEEP`` elements (images much
    larger than a CT slice, e.g. a 4k X-ray) are not kept, so a worker does not hold hundreds of
    MB after one big image."""
    n = math.prod(shape)
    if n > _WORKSPACE_KEEP:
        return np.empty(shape, np.float32)
    pool = getattr(_WORKSPACE, "pool", None)
    if pool is None:
        pool = _WORKSPACE.pool = {}
    buf = pool.get(name)
    if buf is None or buf.size < n:
        buf = pool[name] = np.empty(max(n, 1 << 16), np.float32)
    return buf[:n].reshape(shape)


def estimate_sigma(img: np.ndarray) -> float:
    """Noise standard deviation of an image, in its own units (Donoho's robust MAD estimator).

    The finest diagonal detail of an orthonormal Haar transform,
    ``(a - b - c + d) / 2`` over non-overlapping 2x2 blocks, is almost pure noise on natural /
    medical images and has the noise's standard deviation; ``sigma = median(|detail|) / 0.6745``.
    Constant 2x2 blocks (padding, clipped air, masked-out regions) carry no noise information and
    would drag the median to 0, so they are left out. The median is exact (a histogram of the
    integer ``|a - b - c + d|``).

    Returns:
        sigma >= 0 (0 for a constant image).
    """
    img = _check_image(img)
    h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
    if h == 0 or w == 0:
        return 0.0
    x = img[:h, :w]
    a, b, c, d = x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]
    varied = (a != b) | (a != c) | (a != d)
    wide = np.int16 if img.dtype == np.uint8 else np.int32  # |a - b - c + d| <= 2 * max
    s = np.abs((a.astype(wide) - b) - (c.astype(wide) - d))[varied]
    if s.size == 0:
        return 0.0
    cdf = np.cumsum(np.bincount(s))
    n = int(cdf[-1])
    # median of integers: mean of the two middle order statistics
    m1 = int(np.searchsorted(cdf, (n - 1) // 2, side="right"))
    m2 = int(np.searchsorted(cdf, n // 2, side="right"))
    return float((m1 + m2) / 2.0 / 2.0 / 0.6745)


def _denoise_x_offset(x: np.ndarray, acc: np.ndarray, dx: int, offsets: range, d: np.ndarray,
                      dt: np.ndarray, thr: float) -> None:
    """One x offset of :func:`dct_denoise`: add the thresholded patches of every y offset on the
    grid shifted by ``dx`` into ``acc`` (both ``x`` and ``acc`` padded, float32)."""
    b = d.shape[0]
    hp, wp = x.shape
    cw = ((wp - dx) // b) * b
    xs = _workspace("xs", (hp, cw))
    np.copyto(xs, x[:, dx : dx + cw])
    t = _workspace("t", (hp, cw))
    np.matmul(xs.reshape(-1, b), dt, out=t.reshape(-1, b))  # DCT along x
    acc_x = _workspace("acc_x", (hp, cw))
    acc_x.fill(0.0)
    for dy in offsets:
        nby = (hp - dy) // b
        r0, r1 = dy, dy + nby * b
        c = _workspace("c", (nby, b, cw))
        np.matmul(d, t[r0:r1].reshape(nby, b, cw), out=c)  # DCT along y: 2-D DCT of each patch
        keep = _workspace("keep", (nby, b, cw))
        np.abs(c, out=keep)
        k2 = keep.reshape(nby * b, cw)
        cv2.threshold(k2, thr, 1.0, cv2.THRESH_BINARY, dst=k2)  # 1 where |c| > 3 sigma
        keep[:, 0, 0::b] = 1.0  # the DC term (patch mean) is never thresholded
        np.multiply(c, keep, out=c)
        np.matmul(dt, c, out=keep)  # inverse along y
        acc_x[r0:r1] += k2
    # the inverse along x is linear and the same for every dy: once per dx on the sum
    np.matmul(acc_x.reshape(-1, b), d, out=xs.reshape(-1, b))
    acc[:, dx : dx + cw] += xs


def dct_denoise(
    img: np.ndarray, sigma: float | None = None, block: int = 8, step: int = 4
) -> np.ndarray:
    """DCT-domain denoising: overlapping-block DCT hard thresholding (Yu & Sapiro, IPOL 2011).

    Every ``block`` x ``block`` patch on a grid shifted by ``step`` pixels in x and y is
    transformed with an orthonormal 2-D DCT, coefficients with ``|c| < 3 sigma`` are set to zero
    (the DC term is always kept), the patches are transformed back and the overlapping estimates
    averaged. ``step=1`` is the paper's every-pixel version ((block/step)^2 = 64 shifted grids);
    the default ``step=4`` averages 4 grids, within about 1 dB of ``step=1`` at a small fraction
    of the cost (figures in docs/enhancement.md). The image is mirror-padded by one block so
    every pixel is covered by the same number of patches.

    It is vectorised: per x offset one row-DCT of the whole image (a ``(N, 8) @ (8, 8)``
    product), per y offset one batched column-DCT, threshold and inverse; the inverse row DCT is
    linear, so it is applied once per x offset to the sum over y offsets.

    Args:
        img: 2-D ``uint8`` / ``uint16`` image.
        sigma: noise standard deviation in the image's units; None = :func:`estimate_sigma`.
        block: patch side (8 as in the paper).
        step: grid shift between patch grids, 1..block.

    Returns:
        Denoised image, same shape and dtype (rounded, clipped). A copy of the input when sigma
        is 0.
    """
    img = _check_image(img)
    if not (isinstance(block, (int, np.integer)) and block >= 2):
        raise ValueError(f"block must be an int >= 2, got {block!r}")
    if not (isinstance(step, (int, np.integer)) and 1 <= step <= block):
        raise ValueError(f"step must be an int in 1..block ({block}), got {step!r}")
    if sigma is None:
        sigma = estimate_sigma(img)
    elif not (isinstance(sigma, (int, float, np.number)) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be None or a finite number >= 0, got {sigma!r}")
    if sigma == 0:
        return img.copy()
    b = int(block)
    d = _dct_matrix(b)
    dt = np.ascontiguousarray(d.T)
    h, w = img.shape
    padded = cv2.copyMakeBorder(img, b, b, b, b, cv2.BORDER_REFLECT_101)
    hp, wp = padded.shape
    x = _workspace("x", (hp, wp))
    np.copyto(x, padded)
    acc = _workspace("acc", (hp, wp))
    acc.fill(0.0)
    thr = float(3.0 * sigma)
    offsets = range(0, b, int(step))
    with _single_thread_blas():
        for dx in offsets:
            _denoise_x_offset(x, acc, dx, offsets, d, dt, thr)
    # scale, round to nearest and saturate to the input's type in one pass
    depth = cv2.CV_8U if img.dtype == np.uint8 else cv2.CV_16U
    return cv2.multiply(acc[b : b + h, b : b + w], 1.0 / (len(offsets) ** 2), dtype=depth)
