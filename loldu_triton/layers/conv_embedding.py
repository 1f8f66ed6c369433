"""LoLDUConv2d and LoLDUEmbedding: LoLDU on a convolution's kernel and on an embedding table."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.formulas import accumulation_dtype, add_side_term, side_term
from ..ops.functional import loldu_merged_weight
from .base import LoLDULayer


class LoLDUConv2d(LoLDULayer, nn.Conv2d):
    """An nn.Conv2d whose weight, viewed as out x (in/groups * kh * kw), gets LoLDU.

    The forward convolves with W0 + L diag(e) U built in float32 for each call: for convolutions the rows of
    the GEMM (batch x output positions) far outnumber the weight's, which is where merging is the cheaper
    route (see factors.planner). The delta is kernel-sized, never activation-sized. With ``dropout`` in
    training mode the rank-r path reads dropout(x): the base and the delta then convolve apart (two convolutions).
    """

    base_class = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_width(x, -3, self.in_channels, "channel dim")
        if self.serves_plain():
            return self._conv_forward(x, self.weight, self.bias)
        dropout = self.side_dropout()
        if dropout:
            dtype = self.weight.dtype
            delta = side_term(self.L, self.delta_diagonal(), self.U, accumulation_dtype(dtype)).to(dtype)
            return (self._conv_forward(x, self.weight, self.bias)
                    + self._conv_forward(F.dropout(x, dropout), delta.view_as(self.weight), None))
        weight = loldu_merged_weight(self.weight2d(), self.L, self.U, self.delta_diagonal(), backend="torch")
        return self._conv_forward(x, weight.view_as(self.weight), self.bias)

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + self._loldu_repr()


class LoLDUEmbedding(LoLDULayer, nn.Embedding):
    """An nn.Embedding with LoLDU on its table: ``y = W0[i] + (L[i] * e) U``, no table-sized delta."""

    base_class = nn.Embedding
    bias = None  # an embedding has none; the shared LoLDULayer code asks
    input_dropout = False  # its input is indices: dropout must stay 0

    def _adjust_factors(self) -> None:
        # As in nn.Embedding, the padding row never changes: its row of L diag(e) U is zero.
        if self.padding_idx is not None and not self.L.is_meta:
            L = self.L.clone()  # (the factors may be shared with the parametrization they came from)
            L[self.padding_idx] = 0
            self.register_buffer("L", L, persistent=False)

    def _check_supported(self, name: str) -> None:
        if self.max_norm is not None:
            raise ValueError(f"{name}: nn.Embedding with max_norm renormalizes its weight in place, which LoLDU "
                             f"never modifies; use max_norm=None")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        y = F.embedding(idx, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq,
                        self.sparse)
        if self.serves_plain():
            return y
        rows = F.embedding(idx, self.L)  # (a new tensor: the side term goes into it in place)
        add_side_term(y.view(-1, y.shape[-1]), rows.view(-1, self.rank), self.delta_diagonal(), self.U)
        return y

    def extra_repr(self) -> str:
        return nn.Embedding.extra_repr(self) + self._loldu_repr()
