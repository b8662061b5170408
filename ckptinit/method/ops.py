"""The torch ops the scale trace (scales.py) knows, grouped by what they do to the scale of a
tensor, and the argument-dependent cases among them. Names are what TorchFunctionMode
reports: functions and Tensor methods."""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_flatten

HOMOGENEOUS = frozenset({
    "relu", "relu_", "leaky_relu", "leaky_relu_", "max_pool1d", "max_pool2d", "max_pool3d",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "max_pool2d_with_indices", "adaptive_max_pool2d_with_indices", "_max_pool2d", "flatten",
    "view", "reshape", "permute", "transpose", "t", "contiguous", "mean", "sum", "amax", "max",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "squeeze", "unsqueeze", "__getitem__", "__get__", "clone", "float", "to", "type_as",
    "expand", "expand_as", "repeat", "flip", "roll", "narrow", "select", "split", "chunk",
    "unbind", "tensor_split", "neg", "__neg__", "abs", "half", "bfloat16", "double", "detach",
    "reshape_as", "view_as", "movedim", "moveaxis", "swapaxes", "interpolate",
    "upsample", "upsample_nearest2d", "upsample_bilinear2d", "pixel_shuffle", "pixel_unshuffle",
    "unfold", "fold", "channel_shuffle", "masked_fill", "pad", "clamp", "clamp_", "clip",
})
LIKE = frozenset({"type_as", "expand_as", "view_as", "reshape_as", "to"})  # x.op(other)
ADDITIVE = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__",
                      "__rsub__", "__isub__", "cat", "concat", "concatenate", "stack", "hstack",
                      "vstack", "where"})
JOINING = frozenset({"cat", "concat", "concatenate", "stack", "hstack", "vstack"})
MULTIPLY = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply"})
DIVIDE = frozenset({"div", "div_", "__truediv__", "__itruediv__", "true_divide"})
PRODUCT = frozenset({"matmul", "__matmul__", "bmm", "mm", "einsum"})
AFFINE = frozenset({"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
                    "conv_transpose2d", "conv_transpose3d"})
NORMS = frozenset({"layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm"})
ATTENTION = frozenset({"scaled_dot_product_attention"})
SCALE_FREE_OUT = frozenset({"normalize"})  # F.normalize: forgets the input scale, gives scale 0
# activations close to homogeneous: on fresh nets a unit -> act -> unit pair may move through
# them (the second unit then re-normalised), the paper's chain move for GELU/SiLU MLPs
APPROX_HOMOGENEOUS = frozenset({"gelu", "silu", "hardswish", "elu", "mish", "selu", "celu"})
SLICE_SPLIT = frozenset({"unbind", "chunk", "split"})
SLICE_KEEP = frozenset({"reshape", "view", "permute", "contiguous", "transpose"})


def tensors_in(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def numbers_in(op_args, op_kwargs) -> list[float]:
    return [a for a in tree_flatten((op_args, op_kwargs))[0]
            if isinstance(a, (int, float)) and not isinstance(a, bool)]


def op_name(func) -> str:
    return getattr(func, "__name__", str(func))


AFFINE_AT = {"batch_norm": 3, "instance_norm": 3, "layer_norm": 2, "group_norm": 2,
             "rms_norm": 2}  # position of the weight argument; the bias follows (not rms)


def norm_affine(name: str, args, kwargs):
    """The (weight, bias) arguments of a norm op, None where not given."""
    i = AFFINE_AT[name]
    weight = kwargs.get("weight", args[i] if len(args) > i else None)
    bias = None if name == "rms_norm" else kwargs.get("bias", args[i + 1]
                                                     if len(args) > i + 1 else None)
    return weight, bias


def bias_pieces(args, kwargs, fins: list[torch.Tensor]) -> bool:
    """A 1-D concatenation of 2 or 3 equal parts: the bias of a fused kv/qkv projection kept
    as separate parameters (timm's EVA, BEiT, SwinV2); each part keeps its own scale."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 and isinstance(args[1], int) else 0)
    return (len(fins) in (2, 3) and dim in (0, -1) and all(t.dim() == 1 for t in fins)
            and len({t.numel() for t in fins}) == 1)


def homogeneous_args(name: str, args, kwargs) -> bool:
    """The argument-dependent cases: masked_fill by 0 or +-inf, zero padding, clamp(min=0)."""
    nums = numbers_in(args, kwargs)
    if name == "masked_fill":
        return all(n == 0 or math.isinf(n) for n in nums)
    if name == "pad":
        mode = kwargs.get("mode", args[2] if len(args) > 2 and isinstance(args[2], str) else
                          "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else 0)
        return mode != "constant" or not value
    if name in ("clamp", "clamp_", "clip"):
        lo = kwargs.get("min", args[1] if len(args) > 1 else None)
        hi = kwargs.get("max", args[2] if len(args) > 2 else None)
        return lo == 0 and hi is None
    return True
