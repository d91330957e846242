"""The models of the LLM judges (LlamaGuard, HarmBench's classifier, ...), run by our decoder, one at a time.

eval.py judges after the evaluated model is gone: `Judges` hands out each judge named in turn, loading a judge model
when its judge comes and keeping it only while the next judge runs the same folder (LlamaGuard and its JailbreakBench
variant share one), so that two judge models are never in memory together.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from evals import judges as judge_registry
from evals.generation import Sampling, generate_responses
from evals.judges import JudgeError
from evals.suites import AttackSample
from harness.console import LoadProgressLine, Progress
from ref import kernels as kernel_registry
from ref.config import DTYPES
from ref.data import load_processor
from ref.weights import load_model


def judge_prompt_ids(tokenizer, prompt: str, bos: bool) -> list[int]:
    """The ids a judge model receives for one prompt: the prompt as written (it carries the judge's own template),
    after BOS only where the judge's own code sends one (`LLMJudgeSpec.bos`, which says why for each judge)."""
    return tokenizer.encode(prompt, add_bos=bos)


class JudgeModelGenerate:
    """generate(prompts, max_new_tokens, bos=...) -> texts over a judge model run by our decoder: a text-only LLaMA
    checkpoint (LlamaGuard, HarmBench's classifier; evals.options refuses a LLaVA folder before any generation),
    greedy. Each prompt is sent as written (it carries the judge's own template), after the BOS token only when the
    judge asks for it, since each judge's own code sends its prompt differently (evals/judges.py, by each spec):
    - llamaguard: no BOS. The release runs `tokenizer.apply_chat_template(chat)`, which tokenizes the rendered
      template without special tokens, and LlamaGuard-7b's template writes none.
    - llamaguard_jbb: BOS. JailbreakBench sends the rendered string to a server (Together AI, through litellm) that
      tokenizes it with LlamaGuard-7b's tokenizer, which puts BOS first (as a server tokenizing a string does; that
      server's code is not public).
    - harmbench: BOS. HarmBench's pipeline sends the prompt string to vLLM, which tokenizes it the same way."""

    def __init__(self, judge_dir: str, device: str, dtype: str, quantize: str, batch_size: int,
                 kernels: kernel_registry.Kernels | None = None):
        self.judge_dir = judge_dir
        self.processor = load_processor(judge_dir)
        self.model = load_model(judge_dir, dtype=DTYPES[dtype], device=device, progress=LoadProgressLine(),
                                quantize=None if quantize == "none" else quantize, kernels=kernels)
        self.batch_size = batch_size

    def __call__(self, prompts: list[str], max_new_tokens: int, *, bos: bool) -> list[str]:
        samples = [AttackSample(f"judge-{i}", "judge", p) for i, p in enumerate(prompts)]
        ids = [judge_prompt_ids(self.processor.tokenizer, p, bos) for p in prompts]
        for prompt, prompt_ids in zip(prompts, ids):
            if len(prompt_ids) + max_new_tokens > self.processor.max_length:
                raise JudgeError(f"judge model {self.judge_dir}: a judge prompt of {len(prompt_ids)} tokens does not "
                                 f"fit its context of {self.processor.max_length}: {prompt[:80]!r}...")
        progress = Progress(f"[judge] {Path(self.judge_dir).name}", len(prompts), "prompts")
        outs = generate_responses(self.model, self.processor, samples, ids, Sampling(max_new_tokens=max_new_tokens),
                                  self.batch_size, progress)
        progress.close()
        return [o.response for o in outs]


@dataclass
class Judges:
    """The judges by name, made one at a time (the module's docstring)."""

    names: tuple[str, ...]           # in the order they judge
    registry: dict[str, Callable]    # every judge known, by name
    model_dirs: dict[str, str]       # the model folder of each judge that runs a model
    device: str                      # where the judge models run, in which dtype, with which linears and kernels
    dtype: str
    quantize: str
    kernels: str
    batch_size: int                  # prompts per generation batch
    generate: JudgeModelGenerate | None = None  # the judge model loaded now

    def __iter__(self) -> Iterator[tuple[str, object]]:
        """(name, judge) in turn; the caller drops each judge before asking for the next, so that the previous judge
        model is freed before the next is loaded."""
        for name in self.names:
            folder = self.model_dirs.get(name)
            if folder is not None and (self.generate is None or self.generate.judge_dir != folder):
                self.release()
                self.generate = JudgeModelGenerate(folder, self.device, self.dtype, self.quantize, self.batch_size,
                                                   kernel_registry.resolve(self.kernels))
            yield name, judge_registry.judge(name, self.registry, generate=self.generate if folder else None)
        self.release()

    def release(self) -> None:
        self.generate = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
