"""Classifier initialisations of the papers' code (``TrainConfig.head_init``), applied at a fresh run's start."""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from torch import nn

#: VPT's prior bias: every class starts at probability 0.01 under a sigmoid, -log((1 - 0.01) / 0.01)
VPT_PRIOR_BIAS = -math.log(99)


def init_head(head: nn.Module, scheme: str) -> None:
    """Re-initialise the Linear layers of ``head`` in place ('default' leaves them as they are).

    * 'normal_0.01': weight N(0, 0.01), bias 0 (mmcls ``LinearClsHead``, used by EPT/MedFM);
    * 'trunc_normal_0.02': weight N(0, 0.02) truncated at +-2 (absolute, as timm's ``trunc_normal_(std=.02)``
      that SPT and DA-VPT call, so in practice not truncated), bias 0;
    * 'kaiming_fan_out_prior': weight Kaiming-normal with fan out, bias -log(99) (VPT's ``special_bias``).
    """
    if scheme == "default":
        return
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for linear in linears:
            if scheme == "normal_0.01":
                nn.init.normal_(linear.weight, std=0.01)
                bias = 0.0
            elif scheme == "trunc_normal_0.02":
                trunc_normal_(linear.weight, std=0.02)  # timm's: bounds +-2, absolute
                bias = 0.0
            elif scheme == "kaiming_fan_out_prior":
                nn.init.kaiming_normal_(linear.weight, mode="fan_out")
                bias = VPT_PRIOR_BIAS
            else:
                raise ValueError(f"unknown head_init {scheme!r}")
            if linear.bias is not None:
                linear.bias.fill_(bias)
