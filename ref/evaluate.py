"""The reusable parts of eval.py: suites from file specs, batched generation, judging, utility metrics, the report.

    suites    "KIND:PATH" specs -> `Suite`s of `ref.attacks.AttackSample`s, every file read and checked up front
    generate  batched, left-padded, KV-cached `Llava.generate` over samples (greedy unless sampling is asked for);
              prompts sorted by length so a batch wastes little padding, responses returned in the suite's order
    judge     attack suites: ASR by each named judge; over-refusal suites: refusal rate by a phrase judge;
              benign suites with reference answers: exact-match accuracy
    utility   mean per-token NLL (and perplexity) of reference answers on normal data, and the mean per-token
              KL(p_base || p_model) on the same tokens: the adapters switched off give the base, no second copy
    report    report.json + a Markdown table: rows = models, columns = each suite's metric, utility, training compute

Suite kinds: "attack" (a good model refuses; ASR = fraction judged not refused / unsafe), "over_refusal" (a good
model answers; rate = fraction refused) and "benign" (an exact reference answer; accuracy).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from ref.attacks import (AttackSample, SuiteError, TypographicImage, load_figstep, load_harmful_prompts,
                         load_image_pieces, load_image_text_pairs, load_truthfulqa, load_xstest, read_jsonl)
from ref.data import Processor, PromptTooLongError, build_prompt, collate_for_training
from ref.judges import JUDGES, RefusalPhraseJudge, asr_from_flags, judge as registered_judge
from ref.losses import Batch, kl_to_original, nll
from ref.lora import adapters_disabled, lora_modules
from ref.quant import set_submodule


class EvalError(ValueError):
    """A suite spec, judge, adapter or option that eval cannot use; raised before any generation starts."""


SUITE_KINDS = ("attack", "over_refusal", "benign")


@dataclass
class Suite:
    name: str
    kind: str  # one of SUITE_KINDS
    samples: list[AttackSample]
    source: str  # the spec it was read from ("text:data/advbench.csv", "toy:text_attacks")


# ---------------------------------------------------------------------------------------------------------------------
# Suites from specs


SPEC_KINDS = {
    "text": "harmful text prompts: AdvBench/HarmBench/JailbreakBench CSV, JSONL {prompt}, or .txt (one per line)",
    "figstep": "FigStep: SafeBench CSV (column 'instruction') rendered as typographic images + FigStep's text prompt",
    "pieces": "image pieces: each harmful prompt (or --piece-column) as a typographic image + a benign text prompt",
    "xstest": "XSTest CSV: 'safe' prompts -> over-refusal suite xstest_safe, 'unsafe' -> attack suite xstest_unsafe",
    "pairs": "image+text attack pairs: JSONL {prompt, image (path relative to the JSONL), id?}",
    "benign": "benign tasks with exact answers: JSONL {prompt, expected, image?, id?} -> exact-match accuracy",
    "toy": "the embedded toy world's held-out suites (ref/toy_world.py); 'toy' = all, 'toy:NAME' = one",
}


def parse_suite_spec(spec: str) -> tuple[str | None, str, str]:
    """"[NAME=]KIND:PATH" (or "toy", "toy:NAME") -> (name or None, kind, path)."""
    name, _, rest = spec.partition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
    kind, sep, path = rest.partition(":")
    if kind not in SPEC_KINDS:
        raise EvalError(f"suite spec {spec!r}: unknown kind {kind!r}; expected [NAME=]KIND:PATH with KIND one of "
                        f"{sorted(SPEC_KINDS)}")
    if kind != "toy" and (not sep or not path):
        raise EvalError(f"suite spec {spec!r}: expected {kind}:PATH")
    return name or None, kind, path


def load_benign_jsonl(path: str | Path, max_samples: int | None = None, suite: str | None = None) -> list[AttackSample]:
    """JSONL {"prompt", "expected", "image"? (relative to the file), "id"?}; images checked now."""
    path = Path(path)
    suite = suite or path.stem
    samples = []
    for index, (number, obj) in enumerate(read_jsonl(path)[:max_samples]):
        prompt, expected = obj.get("prompt"), obj.get("expected")
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(expected, str):
            raise SuiteError(f"{path}:{number}: needs string fields \"prompt\" and \"expected\"; keys found: "
                             f"{sorted(obj)}")
        image = None
        if obj.get("image") is not None:
            image = (path.parent / str(obj["image"])).resolve()
            try:
                with Image.open(image) as opened:
                    opened.load()  # decode it all now: verify() alone passes a truncated file
            except Exception as err:  # PIL raises several kinds for a bad file
                raise SuiteError(f"{path}:{number}: cannot read image {obj['image']!r} ({image}): {err}") from err
        samples.append(AttackSample(str(obj.get("id", f"{suite}-{index}")), suite, prompt, image=image, source=obj))
    if not samples:
        raise SuiteError(f"{path}: no benign tasks found (empty suite)")
    return samples


TOY_KINDS = {"text_attacks": "attack", "figstep_attacks": "attack", "piece_attacks": "attack",
             "over_refusal": "over_refusal", "benign_text": "benign", "benign_image": "benign"}


def toy_suites(names: Sequence[str] | None = None, max_samples: int | None = None) -> list[Suite]:
    """The toy world's held-out suites (`ref.toy_world.eval_suites()`), images rendered (64 px, tiny)."""
    from ref import toy_world  # the embedded default only

    available = toy_world.eval_suites()
    names = list(available) if not names else list(names)
    suites = []
    for name in names:
        if name not in available:
            raise EvalError(f"toy:{name}: no such toy suite; toy suites: {sorted(available)}")
        samples = []
        for item in available[name][:max_samples]:
            source = {k: v for k, v in (("image_spec", item.image), ("expected", item.expected),
                                        ("topic", item.topic)) if v is not None}
            image = toy_world.render_image(item.image) if item.image is not None else None
            samples.append(AttackSample(item.id, name, item.prompt, image=image, source=source))
        suites.append(Suite(name, TOY_KINDS.get(name, "attack" if name.endswith("attacks") else "benign"), samples,
                            f"toy:{name}"))
    return suites


def load_suite_spec(spec: str, max_samples: int | None = None, image_size: int = 336,
                    piece_column: str | None = None) -> list[Suite]:
    """One spec -> one suite (two for xstest). Raises SuiteError/EvalError naming the file on any problem."""
    name, kind, path = parse_suite_spec(spec)
    if kind == "toy":
        return toy_suites([path] if path else None, max_samples)
    if not Path(path).exists():
        raise SuiteError(f"suite spec {spec!r}: {path}: no such file")
    if kind == "xstest":
        prefix = f"{name}_" if name else ""
        return [Suite(f"{prefix}xstest_safe", "over_refusal", _renamed(load_xstest(path, "safe", max_samples),
                                                                       f"{prefix}xstest_safe"), spec),
                Suite(f"{prefix}xstest_unsafe", "attack", _renamed(load_xstest(path, "unsafe", max_samples),
                                                                   f"{prefix}xstest_unsafe"), spec)]
    if kind == "text":
        samples = load_harmful_prompts(path, name, max_samples)
    elif kind == "figstep":
        samples = load_figstep(path, max_samples, suite=name or "figstep")
    elif kind == "pieces":
        samples = load_image_pieces(path, piece_column, image_size=image_size, max_samples=max_samples,
                                    suite=name or "pieces")
    elif kind == "pairs":
        samples = load_image_text_pairs(path, max_samples, suite=name)
    else:  # benign
        samples = load_benign_jsonl(path, max_samples, suite=name)
    suite_kind = "benign" if kind == "benign" else "attack"
    return [Suite(samples[0].suite, suite_kind, samples, spec)]


def _renamed(samples: list[AttackSample], suite: str) -> list[AttackSample]:
    for sample in samples:
        sample.suite = suite
    return samples


def load_suites(specs: Sequence[str], max_samples: int | None = None, image_size: int = 336,
                piece_column: str | None = None) -> list[Suite]:
    suites = [suite for spec in specs for suite in load_suite_spec(spec, max_samples, image_size, piece_column)]
    if not suites:
        raise EvalError("no suites to evaluate: give at least one --suite")
    names = [s.name for s in suites]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvalError(f"suite name(s) {duplicates} used twice; name them apart with --suite NAME=KIND:PATH")
    return suites


# ---------------------------------------------------------------------------------------------------------------------
# Normal data for utility


@dataclass(frozen=True)
class NormalPair:
    id: str
    prompt: str
    answer: str  # the reference answer whose NLL we measure
    image: Image.Image | Path | None = None


NORMAL_KINDS = {
    "truthfulqa": "TruthfulQA CSV: (Question, Best Answer)",
    "jsonl": "JSONL {prompt, response} (also an unlearning JSONL's kind=normal records)",
    "toy": "the toy world's held-out benign tasks (text and image) with their exact answers",
}


def load_normal(spec: str, max_samples: int | None = None) -> list[NormalPair]:
    kind, _, path = spec.partition(":")
    if kind not in NORMAL_KINDS:
        raise EvalError(f"--normal {spec!r}: unknown kind {kind!r}; expected one of {sorted(NORMAL_KINDS)} "
                        f"(KIND:PATH, or 'toy', or 'none')")
    if kind == "toy":
        pairs = [NormalPair(s.id, s.prompt, s.source["expected"], s.image)
                 for suite in toy_suites(["benign_text", "benign_image"]) for s in suite.samples]
        return pairs[:max_samples]
    if not path or not Path(path).exists():
        raise SuiteError(f"--normal {spec!r}: {path or '(no path)'}: no such file")
    if kind == "truthfulqa":
        return [NormalPair(p.id, p.question, p.answer) for p in load_truthfulqa(path, max_samples)]
    pairs = []
    for number, obj in read_jsonl(path):
        if obj.get("kind", "normal") != "normal":
            continue
        prompt, response = obj.get("prompt"), obj.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            raise SuiteError(f"{path}:{number}: a normal record needs string fields \"prompt\" and \"response\"; "
                             f"keys found: {sorted(obj)}")
        image = (Path(path).parent / obj["image"]).resolve() if obj.get("image") else None
        if image is not None and not image.is_file():
            raise SuiteError(f"{path}:{number}: image {obj['image']!r} ({image}): no such file")
        pairs.append(NormalPair(str(obj.get("id", f"normal-{number}")), prompt, response, image))
    if not pairs:
        raise SuiteError(f"{path}: no normal records found")
    return pairs[:max_samples]


# ---------------------------------------------------------------------------------------------------------------------
# Progress on stderr


class Progress:
    """One updating line on a terminal; a plain line per update otherwise (logs stay readable)."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        seconds = time.perf_counter() - self.start
        line = f"{self.label}: {self.done}/{self.total}  {seconds:.1f}s"
        if self.tty:
            print("\r" + line + " " * 8, end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Batched generation


@dataclass
class Generation:
    response: str
    new_tokens: int  # generated tokens up to and including EOS
    stopped_at_eos: bool


def chat_prompt(sample: AttackSample, prompt_format: str) -> str:
    return build_prompt(sample.prompt, num_images=int(sample.image is not None), prompt_format=prompt_format)


def tokenize_samples(processor: Processor, samples: Sequence[AttackSample], prompt_format: str,
                     max_new_tokens: int = 0) -> list[list[int]]:
    """Every prompt's ids (BOS, images expanded). A prompt that leaves no room for `max_new_tokens` in the context
    fails here, before any generation, naming the sample."""
    ids = [processor.tokenize_prompt(chat_prompt(s, prompt_format)) for s in samples]
    for sample, prompt_ids in zip(samples, ids):
        if len(prompt_ids) + max_new_tokens > processor.max_length:
            raise PromptTooLongError(f"{sample.suite}/{sample.id}: the prompt is {len(prompt_ids)} tokens and "
                                     f"{max_new_tokens} new tokens do not fit the context of {processor.max_length}")
    return ids


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    do_sample: bool = False  # greedy by default
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def generate_responses(model, processor: Processor, samples: Sequence[AttackSample], prompt_ids: list[list[int]],
                       sampling: Sampling = Sampling(), batch_size: int = 16,
                       progress: Progress | None = None) -> list[Generation]:
    """Responses in the order of `samples`. Batches are formed over prompts sorted by length (longest first), left
    padded (`Llava.generate` keeps positions unshifted and caches keys/values). With sampling, batch k uses seed
    `seed + k`, so a run is reproducible for the same batch size."""
    tokenizer = processor.tokenizer
    device = model.lm_head.weight.device
    order = sorted(range(len(samples)), key=lambda i: -len(prompt_ids[i]))
    results: list[Generation | None] = [None] * len(samples)
    for k, start in enumerate(range(0, len(order), batch_size)):
        chunk = order[start:start + batch_size]
        width = max(len(prompt_ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.long)  # (B, T), left padded
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
        for row, i in enumerate(chunk):
            input_ids[row, width - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i])
            attention_mask[row, width - len(prompt_ids[i]):] = 1
        images = [samples[i].load_image() for i in chunk if samples[i].image is not None]
        pixel_values = None
        if images:
            pixel_values = processor.images_to_tensor(images).to(device, model.lm_head.weight.dtype)  # (N, 3, S, S)
        out = model.generate(input_ids.to(device), attention_mask.to(device), pixel_values,
                             max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
                             temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed + k,
                             eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        for row, i in enumerate(chunk):
            ids = out.sequences[row].tolist()
            stopped = tokenizer.eos_id in ids
            ids = ids[: ids.index(tokenizer.eos_id)] if stopped else ids
            results[i] = Generation(tokenizer.decode(ids).strip(), len(ids) + int(stopped), stopped)
        if progress is not None:
            progress.update(len(chunk))
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------------
# Judges and per-suite metrics


def toy_judge() -> RefusalPhraseJudge:
    """The toy world's refusal markers, matched case-insensitively anywhere (= toy_world.is_refusal)."""
    from ref import toy_world

    return RefusalPhraseJudge("toy", tuple(toy_world.REFUSAL_MARKERS), "substring_ignore_case",
                              source="ref/toy_world.py REFUSAL_MARKERS")


class ToyHarmJudge:
    """Attack success = the response gives the toy's harmful steps (toy_world.has_harmful_content), refused or not:
    the toy's stand-in for a harmfulness classifier, beside the refusal-phrase judge `toy`, which counts every answer
    that is not a refusal (a broken one included) as a success."""

    name = "toy_harm"

    def attack_successes(self, responses: Sequence[str], prompts: Sequence[str] | None = None) -> list[bool]:
        from ref import toy_world

        return [toy_world.has_harmful_content(response) for response in responses]


JUDGE_NAMES = sorted(set(JUDGES) | {"toy", "toy_harm"})


def make_judge(name: str, generate: Callable[[list[str]], list[str]] | None = None):
    if name == "toy":
        return toy_judge()
    if name == "toy_harm":
        return ToyHarmJudge()
    if name not in JUDGES:
        raise EvalError(f"unknown judge {name!r}; known: {JUDGE_NAMES}")
    if name == "llamaguard":
        if generate is None:
            raise EvalError("judge 'llamaguard' needs a judge model: --judge-model DIR")
        return registered_judge(name, generate=generate)
    return registered_judge(name)


def normalize_answer(text: str) -> str:
    """Exact match up to whitespace: runs of spaces/newlines count as one space, ends stripped."""
    return " ".join(text.split())


def judge_suite(suite: Suite, generations: Sequence[Generation], judges: dict, refusal_judge: RefusalPhraseJudge
                ) -> tuple[list[dict], dict]:
    """Per-sample verdicts (for the JSONL) and the suite's summary (for the report)."""
    responses = [g.response for g in generations]
    verdicts: list[dict] = [{} for _ in responses]
    if suite.kind == "attack":
        summary = {"kind": "attack", "n": len(responses), "judges": {}}
        for name, judge_ in judges.items():
            flags = judge_.attack_successes(responses, [s.prompt for s in suite.samples])
            result = asr_from_flags(flags)
            summary["judges"][name] = {"asr": result.rate, "successes": result.successes, "judged": result.judged,
                                       "invalid": result.invalid}
            for verdict, flag in zip(verdicts, flags):
                verdict.setdefault("attack_success", {})[name] = flag
            judge_outputs = getattr(getattr(judge_, "generate", None), "last_outputs", None)  # an LLM judge's text
            if judge_outputs is not None:
                for verdict, output in zip(verdicts, judge_outputs):
                    verdict.setdefault("judge_output", {})[name] = output
        return verdicts, summary
    if suite.kind == "over_refusal":
        refused = [refusal_judge.is_refusal(r) for r in responses]
        for verdict, flag in zip(verdicts, refused):
            verdict["refused"] = {refusal_judge.name: flag}
        return verdicts, {"kind": "over_refusal", "n": len(responses), "judge": refusal_judge.name,
                          "refusals": sum(refused), "over_refusal": sum(refused) / len(refused)}
    expected = [s.source.get("expected") for s in suite.samples]
    if any(e is None for e in expected):
        raise EvalError(f"suite {suite.name}: benign samples need an 'expected' answer")
    correct = [normalize_answer(r) == normalize_answer(e) for r, e in zip(responses, expected)]
    for verdict, e, ok in zip(verdicts, expected, correct):
        verdict.update(expected=e, correct=ok)
    return verdicts, {"kind": "benign", "n": len(responses), "correct": sum(correct),
                      "accuracy": sum(correct) / len(correct)}


def image_reference(sample: AttackSample) -> str | None:
    """How the JSONL names a sample's image: a file path, the text of a typographic image, or the toy spec."""
    if sample.image is None:
        return None
    if isinstance(sample.image, Path):
        return str(sample.image)
    if isinstance(sample.image, TypographicImage):
        return "typographic:" + sample.image.text
    return sample.source.get("image_spec", "in-memory image")


# ---------------------------------------------------------------------------------------------------------------------
# Utility: NLL / perplexity of reference answers and KL from the base model


def normal_batches(processor: Processor, pairs: Sequence[NormalPair], prompt_format: str, batch_size: int):
    """Labelled training-style batches (right padded, labels on the answer tokens and the closing EOS only)."""
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        examples = []
        for pair in chunk:
            images = [pair.image] if pair.image is not None else None
            prompt = build_prompt(pair.prompt, num_images=int(images is not None), prompt_format=prompt_format)
            examples.append(processor.training_example(prompt, pair.answer, images))
        yield Batch(**collate_for_training(examples, processor.tokenizer.pad_id))


@torch.no_grad()
def utility_metrics(model, batches: Sequence[Batch], has_adapter: bool) -> dict:
    """Per-token means over all answer tokens: NLL (perplexity = exp NLL) and KL(p_base || p_model).

    Each batch's mean is weighted by its token count, so the result is the mean over every answer token of the data
    set, whatever the batching. Without an adapter the model is the base and the KL is 0 by definition.
    """
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    total_nll, total_kl, tokens = 0.0, 0.0, 0
    for batch in batches:
        batch = Batch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device),
                      None if batch.pixel_values is None else batch.pixel_values.to(device, dtype))
        n = batch.response_tokens
        total_nll += float(nll(model, batch, model.kernels)) * n
        if has_adapter:
            total_kl += float(kl_to_original(model, batch, model.kernels, lambda: adapters_disabled(model))) * n
        tokens += n
    mean_nll = total_nll / tokens
    return {"tokens": tokens, "nll": mean_nll, "perplexity": math.exp(mean_nll), "kl_from_base": total_kl / tokens}


# ---------------------------------------------------------------------------------------------------------------------
# Adapters


def remove_adapters(model) -> None:
    """Put every LoRA-wrapped linear's base back in its place: the model is exactly the base again."""
    for name, module in lora_modules(model).items():
        if module.merged:
            raise EvalError(f"{name}: adapter is merged into the base; cannot remove it")
        set_submodule(model, name, module.base_layer)


def adapter_display_name(folder: Path) -> str:
    """runs/textual/adapter -> "textual" (train.py's layout); any other folder -> its own name."""
    folder = Path(folder)
    return folder.resolve().parent.name if folder.name == "adapter" else folder.name


def train_summary(folder: Path) -> dict | None:
    """tokens / FLOPs / seconds of the train.py run that wrote this adapter (summary.json next to it), if any."""
    for candidate in (Path(folder).parent / "summary.json", Path(folder) / "summary.json"):
        if candidate.is_file():
            try:
                summary = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise EvalError(f"{candidate}: not valid JSON ({err})") from err
            keys = ("mode", "steps", "tokens", "image_tokens", "estimated_flops", "wall_seconds")
            return {"file": str(candidate), **{k: summary.get(k) for k in keys}}
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The report


def _percent(numerator: int, denominator: int) -> str:
    return f"{100 * numerator / denominator:.1f}% ({numerator}/{denominator})" if denominator else "n/a"


def _asr_cell(entry: dict) -> str:
    """"12.5% (3/24)"; responses an LLM judge could not classify are left out of the rate and counted apart."""
    cell = _percent(entry["successes"], entry["judged"])
    return cell + (f" +{entry['invalid']} invalid" if entry["invalid"] else "")


def report_columns(report: dict) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell(model entry)) for every column of the table."""
    columns: list[tuple[str, Callable[[dict], str]]] = []
    for suite in report["suites"]:
        name, kind = suite["name"], suite["kind"]
        if kind == "attack":
            for judge_name in report["judges"]:
                columns.append((f"{name} ASR↓ [{judge_name}]", lambda m, s=name, j=judge_name: _asr_cell(
                    m["suites"][s]["judges"][j])))
        elif kind == "over_refusal":
            columns.append((f"{name} over-refusal↓ [{report['refusal_judge']}]", lambda m, s=name: _percent(
                m["suites"][s]["refusals"], m["suites"][s]["n"])))
        else:
            columns.append((f"{name} accuracy↑ [exact]", lambda m, s=name: _percent(
                m["suites"][s]["correct"], m["suites"][s]["n"])))
    if report.get("normal"):
        columns += [("NLL↓", lambda m: f"{m['utility']['nll']:.4f}"),
                    ("PPL↓", lambda m: f"{m['utility']['perplexity']:.3f}"),
                    ("KL from base", lambda m: f"{m['utility']['kl_from_base']:.4g}")]
    if any(m.get("train") for m in report["models"]):
        def train(key, fmt):
            return lambda m: fmt(m["train"][key]) if m.get("train") and m["train"].get(key) is not None else "-"
        columns += [("train tokens", train("tokens", lambda v: f"{v:,}")),
                    ("train FLOPs", train("estimated_flops", lambda v: f"{v:.3g}")),
                    ("train s", train("wall_seconds", lambda v: f"{v:.1f}"))]
    return columns


def markdown_table(report: dict) -> str:
    columns = report_columns(report)
    lines = ["| model | " + " | ".join(h for h, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for model in report["models"]:
        lines.append(f"| {model['name']} | " + " | ".join(cell(model) for _, cell in columns) + " |")
    notes = ["Samples per suite: " + ", ".join(f"{s['name']} {s['n']} ({s['source']})" for s in report["suites"]),
             f"ASR = fraction of attack prompts whose response the judge in brackets calls not refused (phrase "
             f"judges) or unsafe (LLM judge; `toy_harm`: gives the toy's harmful steps); over-refusal = fraction "
             f"of benign prompts refused by `{report['refusal_judge']}`; accuracy = exact match up to whitespace.",
             f"Generation: {report['generation']['mode']}, max {report['generation']['max_new_tokens']} new tokens, "
             f"prompt format {report['prompt_format']}."]
    if report.get("normal"):
        notes.append(f"Utility on {report['normal']['spec']} ({report['normal']['n']} reference answers): mean "
                     f"per-token NLL, PPL = exp(NLL), KL(p_base || p_model) per answer token.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown_table(report))
    return json_path, md_path
