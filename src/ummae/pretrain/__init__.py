"""Pre-training wrappers: UM-MAE / MAE (:class:`MaskedAutoencoder`) and :class:`SimMIM`."""
from . import zoo  # noqa: F401  (registers the named models)
from .mae import MaskedAutoencoder, norm_pix_target, patchify, unnormalize_pix, unpatchify
from .simmim import SimMIM

__all__ = ["MaskedAutoencoder", "SimMIM", "patchify", "unpatchify", "norm_pix_target", "unnormalize_pix"]
