import math

import torch.nn as nn

from ummae.models.layers.patch_embed import PatchEmbed


def init_weights(m: nn.Module) -> None:
    """The reference's initialisation (METHOD.md), for ``model.apply``: xavier-uniform Linear,
    zero biases, unit LayerNorm; convolutions normal(0, sqrt(2 / fan_out)) except the patch
    embedding, initialised like a Linear over its flattened kernel (MAE). ``apply`` visits
    children first, so a module with its own rule (an ``init_as_reference`` method, e.g. Swin's
    pos-MLP: 1x1 convs in the reference) overrides what its layers got."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, PatchEmbed):
        w = m.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    elif hasattr(m, "init_as_reference"):
        m.init_as_reference()
