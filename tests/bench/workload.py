"""Seeded ALFWorld-like batches for the benches (core, engine, encoder, server).

Each task (group) gets its own room: 20-40 distinct observation templates over its receptacles
and objects ("You arrive at cabinet 3. On the cabinet 3, you see a soapbar 1, and a
spraybottle 2."), plus a few texts every task shares ("Nothing happens."). Rollouts start in
the room's opening observation and random-walk between neighbouring observations, so states
repeat within and across trajectories as in ALFWorld; about 45% of steps see a fresh variant
(objects moved), so roughly a third of steps are exact singletons, as the paper reports.
About 40% of rollouts succeed, end early and get a terminal reward (10 by default, as the
released code; 1 for the paper's 0/1 view); failures run to max_steps. About 5% of steps are
flagged invalid.
"""

from __future__ import annotations

import numpy as np
from proxmo.core import TrajectoryInput

RECEPTACLES = [
    "cabinet",
    "countertop",
    "drawer",
    "shelf",
    "sinkbasin",
    "fridge",
    "microwave",
    "garbagecan",
    "stoveburner",
    "diningtable",
    "sidetable",
    "coffeemachine",
    "toaster",
    "desk",
    "bed",
    "dresser",
    "safe",
    "armchair",
    "sofa",
    "bathtubbasin",
    "handtowelholder",
]
OBJECTS = [
    "soapbar",
    "spraybottle",
    "apple",
    "knife",
    "mug",
    "plate",
    "bowl",
    "cup",
    "egg",
    "fork",
    "spoon",
    "lettuce",
    "tomato",
    "potato",
    "bread",
    "pan",
    "pot",
    "kettle",
    "candle",
    "cloth",
    "towel",
    "toiletpaper",
    "book",
    "pencil",
    "pen",
    "keychain",
    "creditcard",
    "cellphone",
    "vase",
    "statue",
    "remotecontrol",
    "laptop",
    "pillow",
    "box",
    "newspaper",
    "watch",
]
# Share of steps whose observation is a fresh variant, tuned so that ~30% of steps are exact
# singletons (the paper reports 30-36% on ALFWorld).
FRESH_FRACTION = 0.45
# A harder case for PSA: over half of the step rows are distinct states.
HALF_DISTINCT_FRESH = 0.9
SHARED_TEXTS = [
    "Nothing happens.",
    "You are carrying nothing.",
    "Your task is complete. Nothing happens.",
]


def _objects_phrase(items: list[str]) -> str:
    if not items:
        return "nothing"
    if len(items) == 1:
        return f"a {items[0]}"
    return ", ".join(f"a {o}" for o in items[:-1]) + f", and a {items[-1]}"


def _observation(rng: np.random.Generator, places: list[str]) -> str:
    """One observation at one of the room's places, with a random set of objects."""
    place = places[int(rng.integers(len(places)))]
    picked = [
        f"{OBJECTS[int(o)]} {int(rng.integers(1, 4))}"
        for o in rng.choice(len(OBJECTS), size=int(rng.integers(0, 4)), replace=False)
    ]
    form = int(rng.integers(4))
    if form == 0:
        return f"You arrive at {place}. On the {place}, you see {_objects_phrase(picked)}."
    if form == 1:
        return f"You arrive at {place}. The {place} is closed."
    if form == 2:
        return (
            f"You open the {place}. The {place} is open. In it, you see {_objects_phrase(picked)}."
        )
    held = picked[0] if picked else f"{OBJECTS[int(rng.integers(len(OBJECTS)))]} 1"
    return f"You pick up the {held} from the {place}."


def _room(rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """A task's places and its recurring observations (20-40), the opening view first."""
    n_states = int(rng.integers(20, 41))
    kinds = rng.choice(len(RECEPTACLES), size=8, replace=False)
    places = [f"{RECEPTACLES[k]} {int(rng.integers(1, 7))}" for k in kinds]
    texts = [
        "You are in the middle of a room. Looking quickly around you, you see "
        + ", ".join(f"a {p}" for p in places[:-1])
        + f", and a {places[-1]}."
    ]
    seen = set(texts)
    while len(texts) < n_states:
        text = _observation(rng, places)
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return places, texts


def alfworld_like_batch(
    n_groups: int = 16,
    rollouts: int = 8,
    max_steps: int = 50,
    seed: int = 0,
    *,
    success_reward: float = 10.0,
    fresh_fraction: float = FRESH_FRACTION,
) -> list[TrajectoryInput]:
    """n_groups tasks x `rollouts` trajectories of up to `max_steps` steps, deterministic in seed.

    Trajectory ids are "task{g}-r{k}", group ids "task{g}" (task_id left to default).
    `fresh_fraction` is the share of steps that see a fresh variant; HALF_DISTINCT_FRESH makes
    over half of the rows distinct states (16 x 8 x 50, seed 0: 5,254 rows, 3,156 distinct
    texts, 3,402 distinct states per group summed).
    """
    rng = np.random.default_rng(seed)
    trajs: list[TrajectoryInput] = []
    for g in range(n_groups):
        places, room = _room(rng)
        for k in range(rollouts):
            success = bool(rng.random() < 0.4)
            length = (
                int(rng.integers(max(1, max_steps // 10), max_steps + 1)) if success else max_steps
            )
            position = 0
            states: list[str] = []
            for _ in range(length):
                draw = rng.random()
                if draw < 0.08:
                    states.append(SHARED_TEXTS[int(rng.integers(len(SHARED_TEXTS)))])
                    continue
                if draw < 0.08 + fresh_fraction:
                    # the room changed (objects moved): an observation seen rarely or never again
                    states.append(_observation(rng, places))
                    continue
                states.append(room[position])
                # random walk to a nearby observation (ring), sometimes back to the start
                if rng.random() < 0.05:
                    position = 0
                else:
                    position = (position + int(rng.integers(-2, 3))) % len(room)
            rewards = [0.0] * length
            if success:
                rewards[-1] = success_reward
            invalid = [bool(v) for v in rng.random(length) < 0.05]
            trajs.append(
                TrajectoryInput(
                    trajectory_id=f"task{g}-r{k}",
                    group_id=f"task{g}",
                    task_id="",
                    states=states,
                    rewards=rewards,
                    invalid=invalid,
                )
            )
    return trajs
