from functools import partial

import torch.nn as nn

# Every LayerNorm of the reference models (and so of every published checkpoint) uses eps 1e-6
# (MAE's ``partial(nn.LayerNorm, eps=1e-6)``); PVT's key/value norm is the one exception (see
# backbones/pvt.py).
LayerNorm = partial(nn.LayerNorm, eps=1e-6)
