"""The one interface through which train.py and eval.py learn an embedded world's defaults.

A world that a bare command runs on gives the programs: its committed model, the training options chosen for it on
its validation suites, its unlearning data (`train.py --data NAME`), its suites, normal data and judges (eval.py), and
how many threads its tiny matrices want. `world_of(model)` names the world whose committed model a path is; a model
of no world (a real LLaVA, the SmolLM2 folders) gets the programs' real-model defaults instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from evals.suites import NormalReader, SuiteReader
from worlds.toy import defaults as toy
from worlds.toy import judges as toy_judges


class WorldModelError(ValueError):
    """A path that names a world's committed model, where the model is not (yet) built."""


@dataclass(frozen=True)
class EmbeddedWorld:
    name: str
    model: Path                                  # the committed checkpoint: the bare commands' --model
    build_command: str                           # what writes `model` when it is missing
    train_defaults: dict                         # train.py options chosen on the world's validation suites
    float32_only: bool                           # trained and evaluated in float32 (its tables were)
    threads: int | None                          # torch threads; None: torch's own choice
    data: dict[str, str]                         # train.py --data NAME -> what the records are
    unlearning_records: Callable                 # (name, with_images) -> the records of --data NAME
    suite_readers: dict[str, SuiteReader] = field(default_factory=dict)    # eval.py --suite KIND[:...] (a
    # world's reader of a kind evals/ has, such as pgd, reads that kind's files too)
    normal_readers: dict[str, NormalReader] = field(default_factory=dict)  # eval.py --normal KIND
    judges: dict[str, Callable] = field(default_factory=dict)              # eval.py --judge NAME
    phrase_judges: tuple[str, ...] = ()          # the judges that can decide refusals (--refusal-judge)
    eval_suites: tuple[str, ...] = ()            # eval.py's --suite when none is given
    eval_judges: tuple[str, ...] = ()            # --judge
    refusal_judge: str | None = None             # --refusal-judge
    normal: str | None = None                    # --normal
    pgd_suite: str | None = None                 # the pgd:PATH that is the world's own clean images
    pgd_targets: Callable[[], list[str]] | None = None  # its default --pgd-targets corpus

    def names_model(self, path: str | Path) -> bool:
        return Path(path).resolve() == self.model.resolve()

    def require_model(self, path: str | Path) -> None:
        """A model path that names this world's checkpoint must find it there."""
        if self.names_model(path) and not (self.model / "config.json").is_file():
            raise WorldModelError(f"{self.model}: the {self.name} model is not there; build it with "
                                  f"`{self.build_command}` (or give --model DIR)")


TOY = EmbeddedWorld(
    name="toy", model=toy.TOY_MODEL, build_command="python -m worlds.toy.build", train_defaults=toy.TRAIN_DEFAULTS,
    float32_only=True, threads=toy.THREADS, data=toy.DATA, unlearning_records=toy.unlearning_records,
    suite_readers={"toy": toy.SUITE_READER, "pgd": toy.PGD_SUITE_READER}, normal_readers={"toy": toy.NORMAL_READER}, judges=toy_judges.JUDGES,
    phrase_judges=toy_judges.PHRASE_JUDGES, eval_suites=("toy",), eval_judges=("toy", "toy_harm"),
    refusal_judge="toy", normal="toy", pgd_suite=toy.TOY_PGD, pgd_targets=toy.toy_pgd_targets)

DEFAULT_WORLD = TOY  # what `python train.py` and `python eval.py` run on with no --model
WORLDS = (TOY,)


def world_of(model: str | Path) -> EmbeddedWorld | None:
    """The embedded world whose committed model `model` is, or None (a model of the user's)."""
    return next((world for world in WORLDS if world.names_model(model)), None)


def require_world_model(model: str | Path) -> None:
    """A path naming a world's committed model finds it built; any other path is the user's to check."""
    if (world := world_of(model)) is not None:
        world.require_model(model)
