"""What the bare programs take from the toy: `python train.py` and `python eval.py` with no model named run on the
committed toy checkpoint, its training-side unlearning records, its held-out suites, its normal data and its judges.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from evals.suites import READERS, AttackSample, NormalPair, NormalReader, Suite, SuiteError, SuiteOptions, SuiteReader
from ref.unlearning_data import Record
from worlds.toy import world
from worlds.toy.images import render_image

TOY_MODEL = Path(__file__).resolve().parents[2] / "assets" / "toy_llava"
THREADS = 1  # the toy's tiny matrices gain nothing from more threads and lose a lot when the cores are shared
# train.py's defaults on the toy, chosen on its validation suites (README): the options train.py sets by model
TRAIN_DEFAULTS = {"lr": 3e-4, "eps": [0.5, 1.0, 5.0], "batch_size": 8, "max_steps": 300, "stop_harm_nll": -1.0,
                  "kernels": "reference"}  # the auditable kernels: the toy's tables were made with them


DATA = {  # train.py --data toy[:NAME]
    "toy": "the training side of the split: harmful questions and the typed forms of the training-side image "
           "requests, normal records (with the images of the multimodal baseline's records, in its mode)",
    "toy:questions": "the same without the typed image requests: harmful questions only",
}


def unlearning_records(data: str, with_images: bool) -> list[Record]:
    """train.py --data toy or toy:questions (`DATA`), text only or with images for the multimodal baseline."""
    if data not in DATA:
        raise ValueError(f"--data {data!r}: unknown toy data; known: {sorted(DATA)}")
    return world.unlearning_records(split="train", with_images=with_images, typed_attacks=data == "toy")


# ---------------------------------------------------------------------------------------------------------------------
# eval.py: the held-out suites as evals.suites.Suite, and their benign answers as normal data

SUITE_KINDS = {"text_attacks": "attack", "figstep_attacks": "attack", "piece_attacks": "attack",
               "over_refusal": "over_refusal", "benign_text": "benign", "benign_image": "benign"}
SUITE_KINDS.update({f"val_{name}": kind for name, kind in SUITE_KINDS.items()})
VALIDATION = "validation"  # 'toy:validation' names every validation suite


def toy_suites(names: Sequence[str] | None = None, max_samples: int | None = None) -> list[Suite]:
    """The world's held-out suites (`world.eval_suites()`, all of them by default) or its validation suites
    (`world.validation_suites()`, names starting "val_"), images rendered (64 px, tiny)."""
    available = {**world.eval_suites(), **world.validation_suites()}
    if not names:
        names = list(world.eval_suites())
    elif list(names) == [VALIDATION]:
        names = list(world.validation_suites())
    suites = []
    for name in names:
        if name not in available:
            raise SuiteError(f"toy:{name}: no such toy suite; toy suites: {sorted(available)}")
        samples = []
        for item in available[name][:max_samples]:
            source = {k: v for k, v in (("image_spec", item.image), ("expected", item.expected),
                                        ("topic", item.topic)) if v is not None}
            image = render_image(item.image) if item.image is not None else None
            # what an image attack asks, in words: the topic asked the plain way (for judges that read the request)
            request = world.fill(world.TRAIN_TEMPLATES[0], item.topic) if image and item.topic else None
            samples.append(AttackSample(item.id, name, item.prompt, image=image, source=source, image_name=item.image,
                                        request=request, category=item.topic))
        suites.append(Suite(name, SUITE_KINDS[name], samples, f"toy:{name}"))
    return suites


def _read_suites(name: str | None, path: str, options: SuiteOptions, spec: str) -> list[Suite]:
    return toy_suites([path] if path else None, options.max_samples)


def _read_normal(path: str, max_samples: int | None) -> list[NormalPair]:
    pairs = [NormalPair(s.id, s.prompt, s.source["expected"], s.image)
             for suite in toy_suites(["benign_text", "benign_image"]) for s in suite.samples]
    return pairs[:max_samples]


SUITE_READER = SuiteReader("the embedded toy world's held-out suites (worlds/toy/world.py); 'toy' = all, 'toy:NAME' = one, "
                           "'toy:validation' = the validation suites (training side, for choosing settings)",
                           _read_suites, needs_path=False)
NORMAL_READER = NormalReader("the toy world's held-out benign tasks (text and image) with their exact answers",
                             _read_normal, needs_path=False)


# ---------------------------------------------------------------------------------------------------------------------
# eval.py's pgd:toy: the toy's held-out benign image tasks as the clean images of a PGD attack, its harmful answers
# as the targets

PGD_READER = READERS["pgd"]
TOY_PGD = "toy"  # pgd:toy, the toy's held-out benign image tasks as the clean images of a PGD attack
TOY_PGD_IMAGES = 8  # how many of them pgd:toy attacks without --max-samples (300 steps: ~20 s an image on one core)


def read_pgd_suites(name: str | None, path: str, options: SuiteOptions, spec: str) -> list[Suite]:
    """pgd:JSONL as evals.suites reads it; pgd:toy: the toy's held-out benign image tasks, --max-samples of them (else
    TOY_PGD_IMAGES) spread evenly over the suite, so that a few images are of several kinds of task."""
    if path != TOY_PGD:
        return PGD_READER.read(name, path, options, spec)
    tasks = toy_suites(["benign_image"])[0].samples
    n = min(len(tasks), options.max_samples or TOY_PGD_IMAGES)
    samples = [replace(tasks[k * len(tasks) // n], suite=name or "pgd") for k in range(n)]
    return [Suite(name or "pgd", "pgd", samples, spec, files=())]


def toy_pgd_targets() -> list[str]:
    """The toy's default target corpus: its harmful compliance (HARMFUL_RESPONSE) for every harmful topic."""
    return [world.fill(world.HARMFUL_RESPONSE, topic) for topic in world.HARMFUL_TOPICS]


PGD_SUITE_READER = SuiteReader(PGD_READER.description + ";\n           'pgd:toy': the toy's held-out benign image tasks "
                               f"(--max-samples of them, default {TOY_PGD_IMAGES},\n           spread over the kinds of "
                               "task), its harmful answers the default --pgd-targets", read_pgd_suites, needs_path=False)
