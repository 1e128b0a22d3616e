"""The FMBC MLP on an engine's tensor-parallel linears, for both engine rooms.

up (column-parallel: each rank holds a slice of the intermediate width) -> GELU -> down (row-parallel: one
all-reduce). vLLM's and SGLang's `ColumnParallelLinear`, `RowParallelLinear` and `get_act_fn` take the same
arguments, so each engine's model file builds this one class from its own layers instead of keeping a twin.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fmbc_serve.configuration_fmbc import FMBCConfig


class FMBCMLP(nn.Module):
    def __init__(self, config: FMBCConfig, column_linear: type[nn.Module], row_linear: type[nn.Module],
                 get_act_fn: Callable[[str], nn.Module], quant_config: object | None, prefix: str) -> None:
        super().__init__()
        self.up_proj = column_linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias,
                                     quant_config=quant_config, prefix=f"{prefix}.up_proj")
        self.down_proj = row_linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias,
                                    quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act = get_act_fn(config.engine_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.up_proj(x)
        x, _ = self.down_proj(self.act(x))
        return x
