"""ALFWorld-like state texts for encoder tests and the encoder bench (seeded, no I/O).

Each group is one task in one room: its trajectories wander over the room's receptacles, so a
receptacle's observation repeats across steps and trajectories, as in real rollouts (where exact
grouping still leaves 30-36 % of steps as singletons).
"""

from __future__ import annotations

import random

RECEPTACLES = (
    "cabinet", "countertop", "drawer", "shelf", "fridge", "microwave", "sinkbasin",
    "stoveburner", "garbagecan", "coffeemachine", "toaster", "diningtable", "sidetable",
    "dresser", "bed", "desk", "sofa", "armchair",
)
OBJECTS = (
    "apple", "bread", "butterknife", "cellphone", "creditcard", "egg", "fork", "kettle", "knife",
    "lettuce", "mug", "pan", "peppershaker", "plate", "pot", "potato", "saltshaker", "soapbar",
    "spatula", "spoon", "tomato", "vase", "book", "pencil", "keychain", "pillow", "laptop",
)
TASKS = (
    "put a clean {o} in {r}.", "put some {o} on {r}.", "heat some {o} and put it in {r}.",
    "cool some {o} and put it in {r}.", "examine the {o} with the desklamp.",
    "put two {o} in {r}.",
)


def _room(rng: random.Random) -> list[str]:
    kinds = rng.sample(RECEPTACLES, 9)
    return [f"{kind} {i}" for kind in kinds for i in range(1, rng.randint(2, 4))]


def _contents(rng: random.Random) -> str:
    items = [f"a {o} {rng.randint(1, 3)}" for o in rng.sample(OBJECTS, rng.randint(0, 5))]
    if not items:
        return "nothing"
    return ", ".join(items[:-1]) + (", and " if len(items) > 1 else "") + items[-1]


def alfworld_groups(
    groups: int = 16, trajectories: int = 8, steps: int = 50, seed: int = 0
) -> list[list[list[str]]]:
    """states[group][trajectory][step]."""
    rng = random.Random(seed)
    out: list[list[list[str]]] = []
    for _ in range(groups):
        room = _room(rng)
        seen = {loc: _contents(rng) for loc in room}
        task = rng.choice(TASKS).format(o=rng.choice(OBJECTS), r=rng.choice(room))
        intro = (
            "You are in the middle of a room. Looking quickly around you, you see "
            + ", ".join(f"a {loc}" for loc in room) + f". Your task is to: {task}"
        )
        group: list[list[str]] = []
        for _ in range(trajectories):
            states = [intro]
            held = ""
            for t in range(1, steps):
                loc = rng.choice(room)
                roll = rng.random()
                if roll < 0.55:
                    states.append(f"You arrive at {loc}. On the {loc}, you see {seen[loc]}.")
                elif roll < 0.7:
                    states.append(
                        f"You open the {loc}. The {loc} is open. In it, you see {seen[loc]}."
                    )
                elif roll < 0.8:
                    held = f"{rng.choice(OBJECTS)} {rng.randint(1, 3)}"
                    states.append(f"You pick up the {held} from the {loc}.")
                elif roll < 0.9:
                    states.append("Nothing happens.")
                else:
                    carrying = f"You are carrying: a {held}." if held else "You carry nothing."
                    states.append(f"{carrying} Step {t} of {steps}.")
            group.append(states)
        out.append(group)
    return out
