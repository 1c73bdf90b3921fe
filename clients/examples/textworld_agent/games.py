"""TextWorld games as tasks: generated offline, in-process, from fixed seeds; played through
``textworld.start`` with admissible commands."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import textworld
import textworld.generator
from textworld import EnvInfos, GameOptions

EXAMPLES_DIR = Path(__file__).resolve().parents[1]
DEFAULT_GAMES_DIR = EXAMPLES_DIR / ".cache" / "games"
REQUEST_INFOS = EnvInfos(
    admissible_commands=True, description=True, objective=True,
    won=True, lost=True, score=True, max_score=True,
)  # fmt: skip


@dataclass(frozen=True)
class GameSpec:
    """A game's generation parameters: the same spec always gives the same game."""

    seed: int
    rooms: int = 3
    objects: int = 6
    quest_length: int = 3

    @property
    def name(self) -> str:
        return f"tw-r{self.rooms}-o{self.objects}-q{self.quest_length}-s{self.seed}"


def ensure_game(spec: GameSpec, games_dir: Path = DEFAULT_GAMES_DIR) -> Path:
    """The compiled ``.z8`` of ``spec``, generated (about 2 s) only when not on disk yet."""
    path = games_dir / f"{spec.name}.z8"
    if path.exists():
        return path
    games_dir.mkdir(parents=True, exist_ok=True)
    options = GameOptions()
    options.seeds = spec.seed
    options.nb_rooms = spec.rooms
    options.nb_objects = spec.objects
    options.quest_length = spec.quest_length
    options.path = str(path)
    options.force_recompile = True
    game = textworld.generator.make_game(options)
    return Path(textworld.generator.compile_game(game, options))


@dataclass(frozen=True)
class Observation:
    """What the agent sees at one decision point."""

    state: str  # the room description: the anchor text sent to the service
    goal: str  # the game's objective (constant per game)
    commands: tuple[str, ...]  # admissible commands, sorted (a deterministic order)


class Game:
    """One TextWorld game; ``reset``/``step`` return the next Observation.

    The first feedback carries an ASCII banner, so the state is the room ``description`` instead:
    deterministic text that changes as objects move or open. (``inventory`` would cost one more
    z-machine command per step, a third of the step time.)
    """

    def __init__(self, path: Path) -> None:
        self.name = path.stem
        self._env = textworld.start(str(path), request_infos=REQUEST_INFOS)
        self._last_score = 0.0
        self.won = False
        self.done = False

    def _observe(self, game_state: textworld.GameState) -> Observation:
        self.won = bool(game_state.won)
        state = game_state.description.strip()
        return Observation(state, game_state.objective.strip(),
                           tuple(sorted(game_state.admissible_commands)))  # fmt: skip

    def reset(self) -> Observation:
        self._last_score = 0.0
        self.done = False
        return self._observe(self._env.reset())

    def step(self, command: str) -> tuple[Observation, float]:
        """(next observation, reward = the score increment)."""
        game_state, _, done = self._env.step(command)
        score = float(game_state.score)
        reward, self._last_score = score - self._last_score, score
        self.done = bool(done)
        return self._observe(game_state), reward

    def close(self) -> None:
        self._env.close()
