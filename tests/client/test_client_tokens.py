"""to_token_advantages: each row's scalar on its own response tokens (numpy and torch)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from proxmo_client import BuildError, to_token_advantages

# Four step rows of one multi-turn trajectory: each step's response occupies different tokens.
MASKS = np.array(
    [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
    ],
    dtype=bool,
)
STEP_ADV = np.array([0.5, -1.25, 2.0, -0.75])


def last_mask_bug(step_advantages: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """SkyRL #1507's broadcast: every step's scalar copied with the *last* step's mask."""
    return step_advantages[:, None] * masks[-1][None, :]


def test_each_row_uses_its_own_mask():
    out = to_token_advantages(STEP_ADV, MASKS)
    assert isinstance(out, np.ndarray) and out.shape == MASKS.shape and out.dtype == np.float64
    for r in range(len(STEP_ADV)):
        np.testing.assert_array_equal(out[r][MASKS[r]], STEP_ADV[r])
        np.testing.assert_array_equal(out[r][~MASKS[r]], 0.0)
    # The bug class: the same inputs broadcast with the last mask give a different answer, and
    # the number of trained tokens per row must equal the row's own mask sum.
    assert not np.array_equal(out, last_mask_bug(STEP_ADV, MASKS))
    np.testing.assert_array_equal((out != 0).sum(axis=1), MASKS.sum(axis=1))


def test_numpy_dtypes_and_shapes():
    assert to_token_advantages(STEP_ADV.astype(np.float32), MASKS).dtype == np.float32
    assert to_token_advantages([1, 2, 3, 4], MASKS.astype(np.int64)).dtype == np.float64
    assert to_token_advantages([1, 2, 3, 4], MASKS.astype(np.float16)).dtype == np.float16
    assert to_token_advantages(STEP_ADV, MASKS, dtype=np.float32).dtype == np.float32
    column = to_token_advantages(STEP_ADV[:, None], MASKS)
    np.testing.assert_array_equal(column, to_token_advantages(STEP_ADV, MASKS))
    soft = to_token_advantages([2.0], [[1.0, 0.5, 0.0]])
    np.testing.assert_array_equal(soft, [[2.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    ("advantages", "mask", "field", "message"),
    [
        (STEP_ADV[:3], MASKS, "step_advantages", "has 3 rows but response_mask has 4"),
        (STEP_ADV, MASKS[0], "response_mask", "expected [rows, tokens]"),
        (np.ones((4, 2)), MASKS, "step_advantages", "expected [rows] or [rows, 1]"),
        ([0.0, np.nan, 1.0, 2.0], MASKS, "step_advantages[1]", "must be finite"),
    ],
)
def test_bad_shapes_and_values(advantages, mask, field, message):
    with pytest.raises(BuildError) as info:
        to_token_advantages(advantages, mask)
    assert info.value.field == field
    assert message in info.value.message


def test_torch_keeps_type_dtype_and_device():
    advantages = torch.tensor(STEP_ADV, dtype=torch.bfloat16)
    mask = torch.from_numpy(MASKS)
    out = to_token_advantages(advantages, mask)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.bfloat16 and out.device == mask.device
    expected = advantages.unsqueeze(-1) * mask.to(torch.bfloat16)
    assert torch.equal(out, expected)
    for r in range(len(STEP_ADV)):
        assert torch.equal(out[r] != 0, mask[r])


def test_torch_mixed_inputs():
    mask = torch.from_numpy(MASKS)
    from_numpy = to_token_advantages(STEP_ADV, mask)  # numpy advantages, tensor mask
    assert isinstance(from_numpy, torch.Tensor) and from_numpy.dtype == torch.float32
    np.testing.assert_allclose(from_numpy.numpy(), to_token_advantages(STEP_ADV, MASKS))
    float_mask = to_token_advantages(STEP_ADV, mask.to(torch.float64))
    assert float_mask.dtype == torch.float64  # numpy advantages: the mask's float dtype
    tensor_adv = to_token_advantages(torch.tensor(STEP_ADV), MASKS)  # tensor advantages, numpy mask
    assert isinstance(tensor_adv, torch.Tensor) and tensor_adv.dtype == torch.float64
    assert to_token_advantages(torch.tensor(STEP_ADV), mask, dtype=torch.float16).dtype == (
        torch.float16
    )
    with pytest.raises(BuildError, match="has 3 rows"):
        to_token_advantages(torch.tensor(STEP_ADV[:3]), mask)
    with pytest.raises(BuildError, match=r"step_advantages\[2\]"):
        to_token_advantages(torch.tensor([0.0, 1.0, float("inf"), 0.0]), mask)


def test_the_client_package_never_imports_torch():
    script = (
        "import sys, numpy as np, proxmo_client as pc\n"
        "pc.to_token_advantages(np.ones(2), np.ones((2, 3), dtype=bool))\n"
        "pc.build_request([{'trajectory_id': 'a', 'group_id': 'g', 'states': ['s'],"
        " 'rewards': [1]}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
