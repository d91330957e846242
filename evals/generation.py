"""Batched generation over a suite's samples: prompts in the chat format, left-padded, KV-cached, greedy by default.

Prompts are sorted by length so a batch wastes little padding; responses come back in the suite's order. A prompt that
leaves no room for the new tokens in the context is refused before anything is generated, naming the sample. Under
torchrun the processes share the batches whole and gather the responses (`generate_responses`' `world`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from evals.suites import AttackSample
from harness.console import Progress
from ref.data import Processor, PromptTooLongError, build_prompt
from ref.distributed import Distributed


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


def length_batches(prompt_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """The generation batches, as sample indices: prompts sorted by length (longest first, ties in suite order), cut
    every `batch_size`. Every process of a distributed run forms the same batches, so a batch's prompts and padding,
    hence its greedy responses, do not depend on how many processes share the work."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def generate_batch(model, processor: Processor, samples: Sequence[AttackSample], prompt_ids: list[list[int]],
                   chunk: list[int], sampling: Sampling, seed: int) -> list[Generation]:
    """The responses to the samples `chunk` indexes, generated as one left-padded batch (`Llava.generate` keeps
    positions unshifted and caches keys/values)."""
    tokenizer = processor.tokenizer
    device = model.lm_head.weight.device
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
                         temperature=sampling.temperature, top_p=sampling.top_p, seed=seed,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    generations = []
    for row in range(len(chunk)):
        ids = out.sequences[row].tolist()
        stopped = tokenizer.eos_id in ids
        ids = ids[: ids.index(tokenizer.eos_id)] if stopped else ids
        generations.append(Generation(tokenizer.decode(ids).strip(), len(ids) + int(stopped), stopped))
    return generations


def generate_responses(model, processor: Processor, samples: Sequence[AttackSample], prompt_ids: list[list[int]],
                       sampling: Sampling = Sampling(), batch_size: int = 16, progress: Progress | None = None,
                       world: Distributed = Distributed()) -> list[Generation]:
    """Responses in the order of `samples`, on every process. With sampling, batch k uses seed `seed + k`, so a run
    is reproducible for the same batch size.

    Several processes (`world`) share the batches whole, batch k to rank k % world_size, and gather the responses:
    each batch is the one a single process would generate, so the responses are too (same device kind and threads).
    """
    batches = length_batches(prompt_ids, batch_size)
    mine = {}
    for k in range(world.rank, len(batches), world.world_size):
        mine[k] = generate_batch(model, processor, samples, prompt_ids, batches[k], sampling, sampling.seed + k)
        if progress is not None:  # counts the whole round of batches: the other ranks run theirs alongside
            progress.update(sum(len(chunk) for chunk in batches[k:k + world.world_size]))
    results: list[Generation | None] = [None] * len(samples)
    for shard in world.all_gather_objects(mine):
        for k, generations in shard.items():
            for i, generation in zip(batches[k], generations):
                results[i] = generation
    return results  # type: ignore[return-value]
