"""ummae: Uniform Masking (UM-MAE) pre-training for pyramid vision transformers.

``ummae.create_model`` / ``ummae.list_models`` are the model registry's
(:mod:`ummae.models.registry`), loaded on first use: ``import ummae`` itself, and so
``ummae --help``, does not load torch.

timm: ``ummae.register_timm()`` registers ummae's classifiers with timm as ``ummae_<name>``
(it may be called any number of times), after which timm builds them::

    import timm, ummae
    ummae.register_timm()
    model = timm.create_model("ummae_swin_tiny_256", num_classes=10)

Nothing is registered with timm by importing ummae: the registration is this one call.
"""

__all__ = ["create_model", "list_models", "register_timm"]


def __getattr__(name: str):
    if name in ("create_model", "list_models"):
        from ummae.models import registry  # torch: on first use, not at `import ummae`

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_timm() -> list[str]:
    """Register every ummae classifier with timm as ``ummae_<name>`` (those not registered yet);
    returns timm's names of them all."""
    from ummae.models.classifier import register_with_timm  # torch and timm: only when asked

    return register_with_timm()
