"""The adversarial images of an evaluation's pgd suites (evals/pgd.py's attack), each made once and kept in the run
folder (harness/eval_folder.py).

A pgd suite of clean images becomes one attack suite per budget and threat model (`attack_suites`). Each (attacker
model, clean suite, budget) is attacked once: PNGs in OUT/pgd/<model>/<suite>_<budget>/, and one line per image in
OUT/pgd.jsonl (clean and adversarial target NLL, L-inf, seconds per image, peak memory), appended once every PNG of the
attack is written. A resumed run reuses an attack whose lines and PNGs are there; one a kill cut short has no lines,
and is made again. `pgd_report` sums every attack up for the report.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

from evals import pgd
from evals.options import PGDOptions
from evals.suites import AttackSample, Suite, SuiteError
from harness.console import Progress
from harness.eval_folder import PGD_DIR, PGD_FILE, EvalFolder

PGD_IMAGES_PER_ATTACK = 8  # images optimised together (each against its own prompt and the whole target corpus)


def attack_suites(suites: list[Suite], options: PGDOptions) -> list[Suite]:
    """The suites with every pgd suite expanded into its attack suites (evals.pgd.expand_suites), whose names must not
    clash with another suite's."""
    expanded = pgd.expand_suites(suites, options.configs(), options.threat, options.targets_file)
    names = [s.name for s in expanded]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise SuiteError(f"suite name(s) {clash} used twice (a pgd suite makes <NAME>_<budget>_<threat>); name them "
                         f"apart with --suite NAME=KIND:PATH")
    return expanded


class AdversarialImages:
    """The adversarial images of a run's pgd suites, made or reused (the module's docstring)."""

    def __init__(self, folder: EvalFolder, processor, targets: tuple[str, ...], prompt_format: str):
        self.folder, self.processor, self.targets, self.prompt_format = folder, processor, targets, prompt_format
        self.saved: dict[tuple[str, str, str], list[dict]] = {}
        for row in self.rewrite():
            self.saved.setdefault((row["model"], row["suite"], row["budget"]), []).append(row)
        self.made: dict[tuple[str, str, str], list[AttackSample]] = {}

    def rewrite(self, drop: tuple[str, str, str] | None = None) -> list[dict]:
        """pgd.jsonl without a line a kill cut short (so that new lines append to whole ones) and the lines of
        `drop`, an attack about to be made again."""
        rows = [r for r in self.folder.lines(PGD_FILE) if (r["model"], r["suite"], r["budget"]) != drop]
        self.folder.rewrite(PGD_FILE, rows)
        return rows

    def samples(self, model, model_name: str, suite: pgd.PGDSuite) -> list[AttackSample]:
        """The suite's samples with their adversarial images when `model_name` is evaluated: made or saved before, or
        attacked now by `model` as it is (the attacker itself: the base for transfer, the adapted model for
        white-box)."""
        key = (suite.attacker(model_name), suite.clean_suite, suite.config.name)
        if key not in self.made:
            rows = self.saved.get(key)
            if self.complete(rows, suite):
                print(self.summary(key, rows, "saved by the interrupted run, reused"), file=sys.stderr)
            else:
                if key[0] != model_name:  # eval.py makes the base's images before any adapter is loaded
                    raise RuntimeError(f"pgd: the images of {key} must be made by {key[0]}, not {model_name}")
                rows = self.attack(model, key, suite)
            self.made[key] = [replace(clean, image=self.folder.path / row["png"], image_name=Path(row["png"]).name,
                                      source={**clean.source, "pgd": row})
                              for clean, row in zip(suite.samples, rows)]
        return [replace(sample, suite=suite.name) for sample in self.made[key]]

    def complete(self, rows: list[dict] | None, suite: pgd.PGDSuite) -> bool:
        """A saved attack of these images with these settings, every PNG in place."""
        return (rows is not None and [r["id"] for r in rows] == [s.id for s in suite.samples]
                and all(r["config"] == asdict(suite.config) and (self.folder.path / r["png"]).is_file()
                        for r in rows))

    def attack(self, model, key: tuple[str, str, str], suite: pgd.PGDSuite) -> list[dict]:
        """Attack the suite's clean images with `model`, save the PNGs, then their lines; returns the lines."""
        self.rewrite(drop=key)
        out = self.folder.path
        images = out / PGD_DIR / key[0] / f"{key[1]}_{key[2]}"
        attacks = -(-len(suite.samples) // PGD_IMAGES_PER_ATTACK)
        progress = Progress(f"[{key[0]}] PGD {key[1]} {key[2]}", attacks * suite.config.restarts * suite.config.steps,
                            "steps", min_seconds=10)  # in a log: a line every 10 s, not one per step
        _, records = pgd.attack_samples(model, self.processor, suite.samples, self.targets, suite.config, images,
                                        prompt_format=self.prompt_format, images_per_attack=PGD_IMAGES_PER_ATTACK,
                                        progress=progress)
        progress.close()
        rows = [{"model": key[0], "suite": key[1], **record, "png": (images / record["png"]).relative_to(out)
                 .as_posix()} for record in records]
        self.folder.append(PGD_FILE, rows)
        print(self.summary(key, rows, str(images)), file=sys.stderr)
        return rows

    @staticmethod
    def summary(key: tuple[str, str, str], rows: list[dict], where: str) -> str:
        """One line per attack: what it did to the target NLL, its time per image and its peak memory."""
        return f"eval: [{key[0]}] PGD {key[1]} {key[2]}: " + attack_line(attack_summary(rows)) + f" ({where})"


def make_base_images(model, images: AdversarialImages, suites: list[Suite], names: list[str], done) -> None:
    """The base's images of every pgd suite that a model still to generate shows (transfer, and the base's own
    white-box), made now, while the model is the base: before any adapter is loaded."""
    for suite in suites:
        if isinstance(suite, pgd.PGDSuite) and any(suite.attacker(name) == "base" and (name, suite.name) not in done
                                                   for name in names):
            images.samples(model, "base", suite)


def with_adversarial_images(model, name: str, suites: list[Suite], images: AdversarialImages | None,
                            done) -> list[Suite]:
    """The suites `name` is generated on: each pgd suite it still lacks with the adversarial images it is shown."""
    return [replace(suite, samples=images.samples(model, name, suite))
            if isinstance(suite, pgd.PGDSuite) and (name, suite.name) not in done else suite for suite in suites]


def attack_summary(rows: list[dict]) -> dict:
    """One attack's lines of pgd.jsonl in a few numbers (means over its images; peak memory: the largest)."""
    config = rows[0]["config"]
    return {"model": rows[0]["model"], "suite": rows[0]["suite"], "budget": rows[0]["budget"], "images": len(rows),
            "steps": config["steps"], "restarts": config["restarts"],
            "clean_nll": sum(r["clean_nll"] for r in rows) / len(rows),
            "adv_nll": sum(r["adv_nll"] for r in rows) / len(rows),
            "max_linf_levels": max(r["linf_levels"] for r in rows),
            "seconds_per_image": sum(r["seconds_per_image"] for r in rows) / len(rows),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in rows)}


def attack_line(entry: dict) -> str:
    return (f"{entry['images']} image(s), {entry['steps']} steps x {entry['restarts']} restart(s), target NLL "
            f"{entry['clean_nll']:.4f} -> {entry['adv_nll']:.4f} (mean per token), L-inf <= "
            f"{entry['max_linf_levels']}/255, {entry['seconds_per_image']:.2f} s/image, peak "
            f"{entry['peak_memory_mb']:.0f} MiB")


def pgd_report(folder: EvalFolder, suite_list: list[dict], judge_names: list[str],
               phrase_judges: tuple[str, ...]) -> dict:
    """For a run with pgd suites: every attack in a few numbers (pgd.jsonl), and how to read their ASR."""
    names = [s["name"] for s in suite_list if "pgd" in s]
    if not names:
        return {}
    attacks: dict[tuple[str, str, str], list[dict]] = {}
    for row in folder.lines(PGD_FILE):
        attacks.setdefault((row["model"], row["suite"], row["budget"]), []).append(row)
    phrase = [j for j in judge_names if j in phrase_judges]
    harm = [j for j in judge_names if j not in phrase_judges]
    note = (f"PGD suites ({', '.join(names)}): benign prompts on images optimised (PGD, L-inf budget in the name) to "
            f"make the target answers likely; transfer: the base's images shown to every model; whitebox: images "
            f"optimised against the model of the row, its adapter on (on the base, the transfer images). Their "
            f"prompts are benign, so a refusal-phrase judge counts every answer that is not a refusal as a success")
    note += (f": the ASR of {', '.join(phrase)} there is the rate of answers not refused, not of harmful ones"
             if phrase else "")
    note += (f"; harm is what {', '.join(harm)} judge{'s' if len(harm) == 1 else ''}." if harm else
             "; add a harm judge (toy_harm on the toy; llamaguard or harmbench on a real model) to see harm.")
    return {"pgd_attacks": [attack_summary(rows) for rows in attacks.values()], "pgd_note": note}
