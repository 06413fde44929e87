"""covidlib: COVID-19 vs CAP vs normal detection in chest CT, with chest X-ray as a first phase.

Research use only. Not a medical device; never use it for clinical decisions.
"""
import os as _os

# TensorFlow's C++ start-up chatter (CUDA probes, CPU feature notes) buries notebook output;
# users can still override it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
