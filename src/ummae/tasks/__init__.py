"""Downstream tasks on pre-trained encoders: classification (fine-tuning, probing, eval)."""
from . import classify  # noqa: F401  (registers the classifiers)
