"""covidlib: COVID-19 vs CAP vs normal detection in chest CT, with chest X-ray as a first phase.

Research use only. Not a medical device; never use it for clinical decisions.
"""
import os as _os
import sys as _sys

# TensorFlow's C++ logging after start-up (CUDA probes, cuInit); users can still override it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# OpenCV reads its decoded-image cap once, when cv2 is loaded (TensorFlow loads it too): set
# covidlib's, 2**27 pixels (covidlib.images.MAX_IMAGE_PIXELS), before anything can, unless the
# user chose one.
if "cv2" not in _sys.modules:
    _os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2**27))

__version__ = "0.2.0"


def quiet_tensorflow_import() -> None:
    """Import TensorFlow (when it is Keras' backend) with its C++ start-up lines silenced.

    TensorFlow prints oneDNN / CUDA / CPU-feature notes straight to file descriptor 2 before its
    logging is set up, so no variable silences them; in a notebook they show as red stderr
    boxes. Only that import is silenced: errors raised by it still propagate, and
    ``COVIDLIB_VERBOSE=1`` shows everything.
    """
    if ("tensorflow" in _sys.modules or _os.environ.get("COVIDLIB_VERBOSE")
            or _os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow"):
        return
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        return
    from covidlib.fsutil import stderr_to

    with stderr_to(_os.devnull):
        import tensorflow  # noqa: F401


# A notebook kernel imports the framework anyway: do it quietly here, before any module does.
if "ipykernel" in _sys.modules:
    quiet_tensorflow_import()
