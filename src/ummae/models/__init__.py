"""Models: layers, masking, the encoders (Swin, PVT, ViT on one seam with true positions),
the pre-training wrappers (UM-MAE / MAE, SimMIM), the classifiers and the dense-task models.
They know nothing of tasks, the engine or the command line.

``create_model`` / ``list_models`` are the one door to the named models (:mod:`.registry`)."""
from ummae.models.registry import create_model, list_models, model_kind, register_model

__all__ = ["create_model", "list_models", "model_kind", "register_model"]
