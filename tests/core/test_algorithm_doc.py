"""docs/algorithm.md covers what the core has: every section other files cite, every estimator,
preset, config field, enum value and diagnostic, and the accepted ranges of config.py.

Its worked examples are run by test_worked_examples.py; this file keeps the rest of the page
complete when the code grows (a new preset, field or diagnostic fails here until documented).
"""

from __future__ import annotations

import re
from dataclasses import fields
from enum import Enum

import pytest
from proxmo.core import (
    PRESETS,
    AdvantageResult,
    Estimator,
    EstimatorConfig,
    GroupDiagnostics,
    Normalization,
    Scope,
    Similarity,
    StatsUnit,
    SuccessRateSource,
)
from proxmo.core import batch as core_batch
from proxmo.core import config as core_config

from .test_worked_examples import ALGORITHM_DOC, BLOCKS, block_cases, doc_section

TEXT = ALGORITHM_DOC.read_text(encoding="utf-8")

# Code comments across the repository cite these numbers ("docs/algorithm.md section 5a"):
# they must keep their meaning.
SECTIONS = ("1", "2", "3", "4", "4a", "5", "5a", "6")


def test_sections_keep_their_numbers_in_order() -> None:
    found = re.findall(r"^## (\d+a?)\. ", TEXT, re.M)
    assert tuple(found) == SECTIONS


def test_the_page_links_nothing_outside_the_repository() -> None:
    assert "shared/spec" not in TEXT and "ALGORITHM.md" not in TEXT


@pytest.mark.parametrize("estimator", list(Estimator), ids=lambda e: e.value)
def test_every_estimator_is_in_the_estimator_table(estimator: Estimator) -> None:
    assert re.search(rf"^\| `{estimator.value}` \|", doc_section(TEXT, "4"), re.M)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_is_in_the_preset_table_and_pinned_by_e21(preset: str) -> None:
    assert re.search(rf"^\| `{re.escape(preset)}`", doc_section(TEXT, "4"), re.M)
    pinned = {c["preset"] for b in BLOCKS for c in block_cases(b) if c["kind"] == "config"}
    assert preset in pinned


@pytest.mark.parametrize(
    "name", sorted({f.name for f in fields(EstimatorConfig)} - {"preset"} | {"psc_range"})
)
def test_every_config_field_is_documented(name: str) -> None:
    assert f"`{name}`" in TEXT


@pytest.mark.parametrize(
    "member",
    [m for enum in (Normalization, StatsUnit, SuccessRateSource, Similarity, Scope) for m in enum],
    ids=lambda m: f"{type(m).__name__}.{m.value}",
)
def test_every_enum_value_is_documented(member: Enum) -> None:
    assert f"`{member.value}`" in TEXT


@pytest.mark.parametrize(
    "name",
    [f.name for f in fields(GroupDiagnostics)]
    + [f.name for f in fields(AdvantageResult) if f.name != "groups"],
)
def test_every_output_and_diagnostic_is_in_section_5(name: str) -> None:
    assert f"`{name}`" in doc_section(TEXT, "5")


def _number(value: float) -> str:
    """1e+06 -> 1e6, 0.0 -> 0, as the page writes bounds."""
    return f"{value:g}".replace("e+0", "e").replace("e+", "e")


RANGES = [
    ("gamma", 0.0, 1.0),
    ("psc_range", 0.0, core_config.MAX_PSC_RANGE),
    ("step_weight", 0.0, core_config.MAX_STEP_WEIGHT),
    ("episode_weight", 0.0, core_config.MAX_EPISODE_WEIGHT),
    ("invalid_action_penalty", 0.0, core_config.MAX_INVALID_ACTION_PENALTY),
    ("history_prior", 0.0, core_config.MAX_HISTORY_PRIOR),
    ("hgpo_history_length", 0, core_config.MAX_HGPO_HISTORY_LENGTH),
    ("hgpo_alpha", -core_config.MAX_ABS_HGPO_ALPHA, core_config.MAX_ABS_HGPO_ALPHA),
    ("graph_success_value", 0.0, core_config.MAX_GRAPH_SUCCESS_VALUE),
]


@pytest.mark.parametrize(("name", "low", "high"), RANGES, ids=[r[0] for r in RANGES])
def test_accepted_ranges_match_the_code(name: str, low: float, high: float) -> None:
    rows = [row for row in doc_section(TEXT, "5a").splitlines()
            if row.lstrip().startswith("|") and f"`{name}`" in row.split("|")[1]]
    assert rows, f"no row for {name} in section 5a"
    assert f"[{_number(low)}, {_number(high)}]" in rows[0]


def test_reward_and_embedding_bounds_match_the_code() -> None:
    ranges = doc_section(TEXT, "5a")
    assert f"<= {_number(core_batch.MAX_ABS_REWARD)}" in ranges
    assert f"<= {_number(core_batch.MAX_ABS_EMBEDDING)}" in ranges
    max_beta = f"{core_config.MAX_PSC_BETA:.4f}"
    assert f"[0, {max_beta}]" in ranges
