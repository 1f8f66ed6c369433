"""LoLDUParametrization: the reference code's weight parametrization ``W -> W + L diag(e) U``, which add_loldu
turns into the matching fused LoLDU layer."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..core.formulas import merged_weight
from ..core.settings import clamp_rank
from .state import LoLDUMixin


class LoLDUParametrization(LoLDUMixin, nn.Module):
    """A weight parametrization ``W -> W + L diag(e) U`` (usable with torch.nn.utils.parametrize), for a
    weight viewed as a matrix (out x everything else).

    ``add_loldu`` turns one made for an nn.Linear, nn.Conv2d or nn.Embedding into the matching LoLDU layer.
    """

    def __init__(self, weight: torch.Tensor, rank: int, alpha=None, init="lu", init_seed=0, name="weight"):
        nn.Module.__init__(self)
        self._init_loldu(weight.reshape(weight.shape[0], -1), rank, alpha, init, init_seed, name)

    @classmethod
    def _from_layer(cls, layer: nn.Module, rank, alpha, init, init_seed, factory: str):
        # As add_loldu(rank=...): a rank the weight cannot hold is lowered to its full rank, with a warning.
        name = f"{type(layer).__name__} weight"
        shape = (layer.weight.shape[0], layer.weight[0].numel())
        rank = clamp_rank(rank, shape, f"LoLDUParametrization.{factory}: {name}")
        return cls(layer.weight, rank, alpha, init, init_seed, name=name)

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank, alpha=None, init="lu", init_seed=0):
        """On the out_features x in_features weight. A rank larger than min(out, in) is lowered to it with a
        warning; rank="full" takes it without one."""
        return cls._from_layer(layer, rank, alpha, init, init_seed, "from_linear")

    @classmethod
    def from_conv2d(cls, layer: nn.Conv2d, rank, alpha=None, init="lu", init_seed=0):
        """On the weight viewed as out_channels x (in_channels / groups * kh * kw); rank as in from_linear."""
        return cls._from_layer(layer, rank, alpha, init, init_seed, "from_conv2d")

    @classmethod
    def from_embedding(cls, layer: nn.Embedding, rank, alpha=None, init="lu", init_seed=0):
        """On the num_embeddings x embedding_dim table; rank as in from_linear."""
        return cls._from_layer(layer, rank, alpha, init, init_seed, "from_embedding")

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.loldu_enabled:
            return weight
        return merged_weight(weight.reshape(weight.shape[0], -1), self.L, self.U, self.delta_diagonal()).view_as(weight)
