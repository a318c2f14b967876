import os

import pytest
import torch

# One thread everywhere: on a shared 2-core machine oversubscribed threads make tiny models
# 100x slower, and one thread gives the same kernels (so the same numbers) in subprocesses
# (torchrun, a killed-and-resumed run) as in-process.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- shared data and checkpoints
# (the transfer and classification tests share them; each is made once per session)


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory):
    """Dataset root: ``train/`` (6 images per colour class, 18 in all) and ``val/`` (3 per
    class: 9 images, an odd count). 72 px images; any encoder separates the classes."""
    from _helpers import write_colour_dataset

    return write_colour_dataset(tmp_path_factory.mktemp("colour_data"))


def _save_checkpoint(model, path):
    from ummae.weights import io as ckpt

    state = {"model": model.state_dict(), "model_name": model.model_name, "model_args": model.model_args}
    ckpt.save_atomic(state, path)
    return path


@pytest.fixture(scope="session")
def save_checkpoint():
    """``save(model, path) -> path``: write a registry-built ``model`` in the Trainer's
    checkpoint format (``model``, ``model_name``, ``model_args``)."""
    return _save_checkpoint


@pytest.fixture(scope="session")
def pretrain_ckpt(tmp_path_factory):
    """``make(name)``: path of a checkpoint of the freshly initialised (seed 1) pre-training
    model ``name``, written once per session."""
    from ummae.models.registry import create_model

    folder = tmp_path_factory.mktemp("pretrain_ckpts")
    made = {}

    def make(name: str):
        if name not in made:
            torch.manual_seed(1)
            made[name] = _save_checkpoint(create_model(name), folder / f"{name}.pth")
        return made[name]

    return make


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory, colour_data, pretrain_ckpt):
    """Output folder of a short swin_test fine-tune (from mae_swin_test weights) on
    ``colour_data``, evaluated on its val split after each of its 2 epochs."""
    from _helpers import tiny_finetune_config
    from ummae.tasks.classify import finetune

    out = tmp_path_factory.mktemp("finetuned")
    finetune(tiny_finetune_config(out, colour_data, pretrained=str(pretrain_ckpt("mae_swin_test")), epochs=2))
    return out
