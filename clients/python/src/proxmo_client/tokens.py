"""Broadcast per-step advantages onto response tokens.

The service returns one scalar per step (O(steps) on the wire). A trainer that keeps one row
per step (verl, verl-agent) wants a ``[rows, tokens]`` tensor::

    token_adv[r, j] = step_adv[r] * response_mask[r, j]

Row r's scalar is multiplied by row r's *own* mask. (SkyRL once copied every step's advantage
with the last step's mask, so (N-1)/N of the step samples trained on the wrong tokens; the tests
pin this down.) torch is optional: it is used only when a tensor is passed in, and never imported
by this module.
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar, overload

import numpy as np
import numpy.typing as npt

from proxmo_client.errors import BuildError

MaskT = TypeVar("MaskT")


@overload
def to_token_advantages(
    step_advantages: npt.ArrayLike, response_mask: npt.NDArray[Any], *, dtype: Any = None
) -> npt.NDArray[np.floating[Any]]: ...


@overload
def to_token_advantages(
    step_advantages: Any, response_mask: MaskT, *, dtype: Any = None
) -> MaskT: ...


def to_token_advantages(step_advantages: Any, response_mask: Any, *, dtype: Any = None) -> Any:
    """``step_advantages[:, None] * response_mask``: each row's scalar on its own response tokens.

    ``step_advantages``: ``[rows]`` (or ``[rows, 1]``), e.g. from
    :func:`~proxmo_client.builders.advantages_to_rows`. ``response_mask``: ``[rows, tokens]``,
    bool or 0/1 numbers. Tokens outside the mask get 0.

    The result has the container of its inputs: a torch tensor when either input is one (on the
    mask's device when the mask is a tensor, else on the advantages' device), else a numpy array.
    Its dtype is ``dtype`` when given, else the advantages' floating dtype, else the mask's
    floating dtype, else float32 for torch and float64 for numpy.
    """
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    if torch is not None and (
        isinstance(step_advantages, torch.Tensor) or isinstance(response_mask, torch.Tensor)
    ):
        return _torch_broadcast(torch, step_advantages, response_mask, dtype)
    advantages = np.asarray(step_advantages)
    mask = np.asarray(response_mask)
    out_dtype = np.dtype(dtype) if dtype is not None else _numpy_float_dtype(advantages, mask)
    advantages = _check_shapes(advantages, mask.shape)
    if not np.all(np.isfinite(advantages.astype(np.float64))):
        bad = int(np.flatnonzero(~np.isfinite(advantages.astype(np.float64)))[0])
        raise BuildError(f"step_advantages[{bad}]", "must be finite")
    return advantages.astype(out_dtype)[:, None] * mask.astype(out_dtype)


def _numpy_float_dtype(advantages: np.ndarray, mask: np.ndarray) -> np.dtype[Any]:
    for array in (advantages, mask):
        if np.issubdtype(array.dtype, np.floating):
            return array.dtype
    return np.dtype(np.float64)


def _check_shapes(advantages: Any, mask_shape: tuple[int, ...]) -> Any:
    """Returns the advantages as one value per row; raises BuildError on any shape mismatch."""
    if len(mask_shape) != 2:
        raise BuildError("response_mask", f"expected [rows, tokens], got shape {tuple(mask_shape)}")
    shape = tuple(advantages.shape)
    if len(shape) == 2 and shape[1] == 1:
        advantages = advantages[:, 0]
    elif len(shape) != 1:
        raise BuildError("step_advantages", f"expected [rows] or [rows, 1], got shape {shape}")
    if advantages.shape[0] != mask_shape[0]:
        raise BuildError(
            "step_advantages",
            f"has {advantages.shape[0]} rows but response_mask has {mask_shape[0]}",
        )
    return advantages


def _torch_broadcast(torch: Any, step_advantages: Any, response_mask: Any, dtype: Any) -> Any:
    adv_is_tensor = isinstance(step_advantages, torch.Tensor)
    mask_is_tensor = isinstance(response_mask, torch.Tensor)
    if mask_is_tensor:
        device = response_mask.device
    else:
        device = step_advantages.device
    if dtype is None:
        if adv_is_tensor and step_advantages.is_floating_point():
            dtype = step_advantages.dtype
        elif mask_is_tensor and response_mask.is_floating_point():
            dtype = response_mask.dtype
        else:
            dtype = torch.float32
    advantages = torch.as_tensor(step_advantages, device=device)
    mask = torch.as_tensor(response_mask, device=device)
    advantages = _check_shapes(advantages, tuple(mask.shape))
    finite = torch.isfinite(advantages.to(torch.float64))
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0, 0])
        raise BuildError(f"step_advantages[{bad}]", "must be finite")
    return advantages.to(dtype).unsqueeze(-1) * mask.to(dtype)
