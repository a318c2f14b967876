"""Models: layers, masking, the encoders (Swin, PVT, ViT on one seam with true positions),
the pre-training wrappers (UM-MAE / MAE, SimMIM), the classifiers and the dense-task models
(stage maps, detectors, UperNet). They know nothing of tasks, the engine, weights files or the
command line.

``create_model`` / ``list_models`` are the one door to the named models (:mod:`.registry`).
Each family file (swin.py, pvt.py, vit.py) holds its architecture table and registers all its
models in one ``register_family`` call (:mod:`.family`), under the reference names (UM-MAE /
MAE / SimMIM code bases), each meaning exactly the reference's architecture:

* ``mae_swin_tiny_256``, ``mae_swin_small_256``, ``mae_pvt_small_256``: 512-d, 2-block decoder
  (``dec512d2b``);
* ``mae_swin_large_256``: the paper's Swin-L run, 8-block decoder and pos-MLP width 64
  (the reference's ``mae_swin_large_256_dec512d8b64pmd``);
* ``mae_vit_base_patch16`` / ``mae_vit_large_patch16``: MAE's 8-block decoder (``dec512d8b``);
  ``mae_vit_base_patch16_dec512d2b`` is the 2-block decoder of the paper's ViT-B rows;
* ``simmim_*``: the encoder with its dense-map settings (Swin window 16, PVT sr 8-4-2-1);
* ``swin_tiny_256``, ``pvt_small_256``, ``vit_base_patch16``...: the classifiers;
* the detectors of :mod:`ummae.detector_specs` (``gfl``, ``maskrcnn``, ...) and ``upernet``:
  dense-task heads, whose models are named ``<head>_<classifier>`` (``gfl_swin_tiny_256``).

``*_nano_128`` for the demo and small experiments; ``*_test`` for CI."""

# Importing the family and dense-task files runs their registrations.
from ummae.models import detectors, pvt, swin, upernet, vit  # noqa: F401
from ummae.models.registry import classifier_for, create_model, list_models, model_kind, register_model

__all__ = ["classifier_for", "create_model", "list_models", "model_kind", "register_model"]
