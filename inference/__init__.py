"""Inference: what turns trained stages and a store (or a video) into predictions, pictures and scores.

Used by jobs/predict.py, jobs/evaluate.py and jobs/rollout.py. Unlike `model/` (the lean trainer),
this package may load the frozen encoders, always lazily, inside the functions that encode or decode.
"""

from pipeline.errors import Re2pixError


class InferenceError(Re2pixError):
    """The flags, files, trained models or data given to prediction or evaluation cannot work together."""
