"""Every worked example of docs/algorithm.md section 6, run from the page itself.

Each example there is a heading `### E<n>. title` followed by a fenced `json` block with its
inputs and expected numbers (the block format is described at the top of section 6). This file
parses the section, runs every case of every block through the core and compares, so the page
and the code cannot drift apart: a number changed on either side fails here, and so does a
labelled example without a block (or a block without a label).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from proxmo.core import (
    PRESETS,
    AdvantageResult,
    Similarity,
    StepBatch,
    TrajectoryInput,
    apply_update,
    decay,
    group_success_rates,
    psc_weights,
    required_features,
    resolve_config,
    success_rate,
    task_batch_counts,
    tfidf_features,
    uses_history,
)

from .helpers import run, traj

ALGORITHM_DOC = Path(__file__).resolve().parents[2] / "docs" / "algorithm.md"
DEFAULT_TOLERANCE = 1e-6
# Keys of a case that merge with the block's defaults key by key instead of replacing them.
MERGED_KEYS = ("config", "expect")

Case = dict[str, Any]


def doc_section(text: str, number: str) -> str:
    """The body of `## <number>. ...` up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(number)}\. .*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise AssertionError(f"docs/algorithm.md has no section {number}")
    return match.group(1)


def example_labels(section: str) -> list[str]:
    """The labels of the `### E<n>.` headings, in order."""
    return re.findall(r"^### (E\d+)\.", section, re.M)


def example_blocks(section: str) -> list[dict[str, Any]]:
    """Every fenced json block of the section, parsed."""
    return [json.loads(body) for body in re.findall(r"^```json\n(.*?)^```", section, re.M | re.S)]


def block_cases(block: dict[str, Any]) -> list[Case]:
    """The block's cases, each with the block's defaults filled in (config and expect merge)."""
    defaults = {k: v for k, v in block.items() if k not in ("example", "cases")}
    cases: list[Case] = []
    for own in block.get("cases", [{}]):
        case = {**defaults, **own}
        for key in MERGED_KEYS:
            case[key] = {**defaults.get(key, {}), **own.get(key, {})}
        cases.append(case)
    return cases


def _load() -> tuple[list[str], list[dict[str, Any]]]:
    section = doc_section(ALGORITHM_DOC.read_text(encoding="utf-8"), "6")
    return example_labels(section), example_blocks(section)


LABELS, BLOCKS = _load()


def example_texts(section: str) -> dict[str, str]:
    """Per label, the example's text without its json block."""
    pieces = re.split(r"^### (E\d+)\.", section, flags=re.M)[1:]
    return {
        label: re.sub(r"^```json\n.*?^```", "", body, flags=re.M | re.S)
        for label, body in zip(pieces[::2], pieces[1::2], strict=True)
    }


def block_numbers(block: dict[str, Any]) -> list[float]:
    """Every number of a block, inputs and expectations, as absolute values."""
    found: list[float] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found.append(abs(float(value)))

    walk(block)
    return found


def example(label: str) -> dict[str, Any]:
    """The json block of one example."""
    return next(b for b in BLOCKS if b.get("example") == label)


# --- running a case ----------------------------------------------------------------------------


def _close(name: str, actual: Any, expected: Any, tolerance: float) -> None:
    """Expected numbers within `tolerance` (absolute); strings and booleans exactly."""
    if isinstance(expected, list) and expected and isinstance(expected[0], str):
        assert [getattr(a, "value", a) for a in actual] == expected, name
    elif isinstance(expected, (bool, str)):
        assert getattr(actual, "value", actual) == expected, name
    else:
        np.testing.assert_allclose(
            np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
            rtol=0, atol=tolerance, err_msg=name,
        )


def _trajectory(spec: dict[str, Any]) -> TrajectoryInput:
    n = len(spec["states"])
    return traj(
        spec["id"], spec["group"], spec["states"], spec["rewards"],
        invalid=[bool(v) for v in spec.get("invalid", [0] * n)],
        success=spec.get("success"), task_id=spec.get("task", ""),
        state_keys=spec.get("keys"), embeddings=spec.get("embeddings"),
    )


def _advantage_outputs(result: AdvantageResult) -> dict[str, Any]:
    return {
        "returns": result.returns,
        "episode_advantages": result.episode_advantages,
        "step_advantages": result.step_advantages,
        "advantages": result.advantages,
        "baselines": result.returns - result.step_advantages,  # PSA's B = G - A^S
    }


def _check_advantages(case: Case, tolerance: float) -> None:
    cfg = resolve_config(case.get("preset", ""), case["config"])
    rates = case.get("group_success_rate")
    _, result = run(
        [_trajectory(t) for t in case["trajectories"]], cfg,
        group_success_rate=None if rates is None else np.asarray(rates, dtype=np.float64),
    )
    outputs = _advantage_outputs(result)
    for name, expected in case["expect"].items():
        if name == "groups":
            for field, values in expected.items():
                _close(f"groups.{field}", getattr(result.groups, field), values, tolerance)
        else:
            _close(name, outputs[name], expected, tolerance)


def _check_psc_weights(case: Case, tolerance: float) -> None:
    w_plus, w_minus = psc_weights(np.asarray(case["p"], dtype=np.float64), case["alpha"],
                                  case["beta"])
    actual = {"w_plus": w_plus, "w_minus": w_minus}
    for name, expected in case["expect"].items():
        _close(name, actual[name], expected, tolerance)


def _check_tfidf_cosine(case: Case, tolerance: float) -> None:
    texts = case["texts"]
    batch = StepBatch.from_trajectories(
        [traj(f"d{i}", "g", [text], [0.0]) for i, text in enumerate(texts)]
    )
    features = tfidf_features(batch)
    assert features is not None, "empty vocabulary"
    rows = features.matrix[features.row_index].toarray()
    cosines = rows @ rows.T
    for i, j, expected in case["expect"]["pairs"]:
        _close(f"cosine({i}, {j})", cosines[i, j], expected, tolerance)


def _check_history(case: Case, tolerance: float) -> None:
    previous = case["previous"]
    updated = apply_update(
        None if previous is None else (float(previous[0]), float(previous[1])),
        case["successes"], case["trials"], rho=decay(case["half_life"]), prior=case["prior"],
    )
    _close("updated", updated, case["expect"]["updated"], tolerance)


def _check_config(case: Case, tolerance: float) -> None:
    similarity = Similarity[case.get("default_similarity", "TFIDF")]
    cfg = resolve_config(case["preset"], case["config"], default_similarity=similarity)
    for name, expected in case["expect"].items():
        _close(name, getattr(cfg, name), expected, tolerance)


CHECKS: dict[str, Callable[[Case, float], None]] = {
    "advantages": _check_advantages,
    "psc_weights": _check_psc_weights,
    "tfidf_cosine": _check_tfidf_cosine,
    "history": _check_history,
    "config": _check_config,
}


def check_case(case: Case) -> None:
    """Run one case and compare every expected number (AssertionError on a mismatch)."""
    CHECKS[case["kind"]](case, float(case.get("tolerance", DEFAULT_TOLERANCE)))


def _all_cases() -> Iterator[Any]:
    for block in BLOCKS:
        for index, case in enumerate(block_cases(block)):
            yield pytest.param(case, id=f"{block.get('example')}-case{index}")


@pytest.mark.parametrize("case", list(_all_cases()))
def test_worked_example(case: Case) -> None:
    check_case(case)


# --- the page and the runner agree --------------------------------------------------------------


def test_every_labelled_example_has_one_block_and_back() -> None:
    block_labels = [b.get("example") for b in BLOCKS]
    assert LABELS, "no worked examples found in docs/algorithm.md section 6"
    assert len(set(LABELS)) == len(LABELS), f"duplicate labels: {LABELS}"
    assert block_labels == LABELS, (
        f"headings {LABELS} and json blocks {block_labels} must match one to one, in order"
    )
    assert LABELS == [f"E{n}" for n in range(1, len(LABELS) + 1)], "labels must run E1, E2, ..."


def test_numbers_in_the_text_are_numbers_of_the_block() -> None:
    """A number written with 4+ decimals beside an example (a result quoted in its prose) must
    be one of its block's numbers at the precision written, so prose and block cannot drift."""
    section = doc_section(ALGORITHM_DOC.read_text(encoding="utf-8"), "6")
    for label, text in example_texts(section).items():
        numbers = block_numbers(example(label))
        for written in re.findall(r"\d+\.\d{4,}", text):
            half_unit = 0.5 * 10.0 ** -len(written.split(".")[1]) + 1e-12
            assert any(abs(n - float(written)) <= half_unit for n in numbers), (
                f"{label}: {written} in the text is not a number of its block"
            )


def test_every_case_has_a_known_kind_and_expects_something() -> None:
    for block in BLOCKS:
        for case in block_cases(block):
            label = block["example"]
            assert case.get("kind") in CHECKS, f"{label}: unknown kind {case.get('kind')}"
            assert case["expect"], f"{label}: a case without expected numbers"


def _numbers(holder: Any) -> list[tuple[Any, Any]]:
    """(container, key) of every number inside `holder`, depth first, in order."""
    items = holder.items() if isinstance(holder, dict) else enumerate(holder)
    found: list[tuple[Any, Any]] = []
    for key, value in items:
        if isinstance(value, (dict, list)):
            found += _numbers(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found.append((holder, key))
    return found


def _perturbed(case: Case) -> Case:
    """The case with its last expected number (a value, never a row index of a pair) moved by
    1000 tolerances, and by at least 1e-3."""
    broken: Case = json.loads(json.dumps(case))
    numbers = _numbers(broken["expect"])
    assert numbers, "no number to perturb"
    holder, key = numbers[-1]
    holder[key] += max(1000 * float(case.get("tolerance", DEFAULT_TOLERANCE)), 1e-3)
    return broken


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_a_wrong_number_in_the_page_fails(kind: str) -> None:
    """The runner can fail: the first case of each kind, one expected number moved, must fail."""
    case = next(c for b in BLOCKS for c in block_cases(b) if c["kind"] == kind)
    check_case(case)
    with pytest.raises(AssertionError):
        check_case(_perturbed(case))


# E7's rows, read from the page (tests/core/test_psa_kernel.py runs them through its kernels).
_E7_ROWS = example("E7")["trajectories"]
E7_STATES = [row["states"][0] for row in _E7_ROWS]
E7_RETURNS = [float(row["rewards"][0]) for row in _E7_ROWS]


# --- beyond the page: how the engine feeds the core ----------------------------------------------


def test_success_rate_is_undefined_without_trials_or_prior() -> None:
    assert success_rate(3.0, 12.0, 1.0) == pytest.approx(4 / 14)
    assert np.isnan(success_rate(0.0, 0.0, 0.0))


def test_task_batch_counts_and_group_rates() -> None:
    """All of a batch's groups of one task are one update of that task (section 2)."""
    trajs = [
        traj("a", "g1", ["s"], [1.0], task_id="task"),
        traj("b", "g1", ["s"], [0.0], task_id="task"),
        traj("c", "g2", ["s"], [0.0], task_id="other"),
        traj("d", "g3", ["s"], [0.0], task_id="task", success=True),
    ]
    batch = StepBatch.from_trajectories(trajs)
    cfg = resolve_config("proxmo")
    task_ids, successes, trials = task_batch_counts(batch, cfg)
    assert task_ids == ["task", "other"]
    assert successes.tolist() == [2, 0] and trials.tolist() == [3, 1]
    rates = group_success_rates(batch, {"task": 0.25, "other": 0.5})
    assert rates.tolist() == [0.25, 0.5, 0.25]


def test_uses_history_and_required_features() -> None:
    assert uses_history(resolve_config("proxmo"))
    assert not uses_history(resolve_config("paper"))
    assert not uses_history(
        resolve_config("grpo", {"psc_enabled": True, "success_rate_source": "HISTORY"})
    )
    assert uses_history(
        resolve_config("gigpo", {"psc_enabled": True, "success_rate_source": "HISTORY"})
    )
    assert required_features(resolve_config("paper")) is Similarity.TFIDF
    encoder = resolve_config("proxmo", default_similarity=Similarity.ENCODER)
    assert required_features(encoder) is Similarity.ENCODER
    assert required_features(resolve_config("gigpo", {"similarity": "TFIDF"})) is None
    assert required_features(resolve_config("paper", {"similarity": "EXACT"})) is None


def test_every_preset_resolves_every_field() -> None:
    for name, spec in PRESETS.items():
        assert spec.description
        cfg = resolve_config(name)
        assert cfg.preset == name
        assert all(getattr(cfg, f) is not None for f in cfg.__dataclass_fields__)
