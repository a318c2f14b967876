"""ummae: Uniform Masking (UM-MAE) pre-training for pyramid vision transformers.

Importing the package registers its classifiers with timm as ``ummae_<name>``, so
``timm.create_model("ummae_swin_tiny_256", num_classes=10)`` works after ``import ummae``.
The registration is done as soon as timm is imported (at once when it already is), and
``create_model`` / ``list_models`` load the models on first use: ``import ummae`` itself, and
so ``ummae --help``, does not load torch.
"""

import importlib.abc
import sys

__all__ = ["create_model", "list_models"]


def __getattr__(name: str):
    if name in __all__:
        from ummae.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _initializing(name: str) -> bool:
    return bool(getattr(getattr(sys.modules.get(name), "__spec__", None), "_initializing", False))


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Registers ummae's classifiers with timm once timm is imported and no ummae module is
    half-imported (registering imports the model modules, which import timm themselves): it
    wraps the loaders of timm and of ummae's modules, tries after each one has run, and leaves
    ``sys.meta_path`` once it is done. It finds nothing itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm" and not fullname.startswith("ummae."):
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                self.register(just_run=fullname)

            spec.loader.exec_module = exec_then_register
        return spec

    def register(self, just_run: str = "") -> None:
        if self not in sys.meta_path or "timm" not in sys.modules:
            return
        if any(
            _initializing(n) for n in list(sys.modules) if n != just_run and (n == "timm" or n.startswith("ummae."))
        ):
            return  # the module that imports it is still being run: after it
        sys.meta_path.remove(self)
        from ummae.models.classifier import register_with_timm

        register_with_timm()


_hook = _RegisterWithTimm()
sys.meta_path.insert(0, _hook)
if "timm" in sys.modules:
    _hook.register()
