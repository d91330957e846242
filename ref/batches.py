"""The method's data as a run draws it: seeded streams of records, cut into the batches of the three terms.

    streams = Streams(len(harmful), len(normal), batch_size, seed, ranks, grad_accum)
    maker = BatchMaker(processor, harmful, normal, prompt_format=..., mismatch=..., seed=...)
    for harm, normal, position in streams.next_step(rank):       # this rank's micro-batches of the next step
        batches = maker.term_batches(harm, normal, step, position)  # ref.losses.TermBatches

A stream's position is two integers (epoch, cursor), kept in a training checkpoint: a resumed run draws the same
records as an uninterrupted one, and a step draws the same records however it is split across ranks and micro-batches.
"""

from __future__ import annotations

import random

import torch

from ref.data import Processor, PromptTooLongError, build_prompt, collate_for_training
from ref.losses import Batch, TermBatches
from ref.unlearning_data import HarmfulRecord, NormalRecord


class RecordError(ValueError):
    """A record the model cannot train on: its prompt leaves no room for a response in the context."""


class RecordStream:
    """Endless batches over a list, reshuffled each epoch from (seed, epoch); its position is two integers."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.cursor = epoch, cursor
        self._orders: tuple[int, list[int]] | None = None  # (epoch, its order): drawn once per epoch

    def _order(self) -> list[int]:
        if self._orders is None or self._orders[0] != self.epoch:
            # torch seeds are 64-bit: any seed (train.py's go up to 2**63 - 1) and epoch map into them; below 2**64
            # the value is unchanged, so the streams of every run made so far stay the same
            generator = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**64)
            self._orders = (self.epoch, torch.randperm(self.size, generator=generator).tolist())
        return self._orders[1]

    def next_indices(self) -> list[int]:
        indices = []
        while len(indices) < self.batch_size:
            if self.cursor >= self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
            order = self._order()
            take = min(self.batch_size - len(indices), self.size - self.cursor)
            indices += order[self.cursor:self.cursor + take]
            self.cursor += take
        return indices

    def position(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


class Streams:
    """The harmful and the normal record streams, seeded apart; their positions are part of a checkpoint.

    A step draws its whole batch (--batch-size x ranks x --grad-accum records of each) from the one stream every rank
    follows, and cuts it into batches of --batch-size: micro-batch m of rank r takes the (m * ranks + r)-th. So a step
    sees the same records however it is split, and resuming on another number of ranks continues the same stream."""

    def __init__(self, n_harmful: int, n_normal: int, batch_size: int, seed: int, ranks: int = 1,
                 grad_accum: int = 1):
        self.batch_size, self.ranks, self.grad_accum = batch_size, ranks, grad_accum
        step_size = batch_size * ranks * grad_accum
        self.harmful = RecordStream(n_harmful, step_size, seed)
        self.normal = RecordStream(max(n_normal, 1), step_size, seed + 1)
        self.has_normal = n_normal > 0

    def next_step(self, rank: int = 0) -> list[tuple[list[int], list[int], int]]:
        """This rank's micro-batches of the next step: (harmful indices, normal indices, position of the first
        harmful record in the step's whole batch)."""
        harmful = self.harmful.next_indices()
        normal = self.normal.next_indices() if self.has_normal else []
        size, pieces = self.batch_size, []
        for micro in range(self.grad_accum):
            start = (micro * self.ranks + rank) * size
            pieces.append((harmful[start:start + size], normal[start:start + size], start))
        return pieces

    def positions(self) -> dict:
        return {"harm_position": self.harmful.position(), "normal_position": self.normal.position()}

    def restore(self, saved: dict) -> None:
        self.harmful.epoch, self.harmful.cursor = saved["harm_position"]["epoch"], saved["harm_position"]["cursor"]
        self.normal.epoch, self.normal.cursor = saved["normal_position"]["epoch"], saved["normal_position"]["cursor"]


class BatchMaker:
    """Records -> tokenized batches with response-only labels; images preprocessed once and cached.

    `mismatch`: L_helpful's response, the record's helpful one ("helpful") or a random normal answer ("random", Yao et
    al.'s variant, drawn from `seed`). `ascent=False`: the supervised baseline, which never ascends, gets no harmful
    batch."""

    def __init__(self, processor: Processor, harmful: list[HarmfulRecord], normal: list[NormalRecord],
                 prompt_format: str = "llava-hf", mismatch: str = "helpful", seed: int = 0, ascent: bool = True):
        self.processor, self.harmful, self.normal = processor, harmful, normal
        self.prompt_format, self.mismatch, self.seed, self.ascent = prompt_format, mismatch, seed, ascent
        self.images: dict[str, torch.Tensor] = {}

    def image(self, path: str) -> torch.Tensor:
        if path not in self.images:
            self.images[path] = self.processor.images_to_tensor([path])  # (1, 3, S, S)
        return self.images[path]

    def check_fits(self, record: HarmfulRecord | NormalRecord, where: str) -> None:
        """The record's prompt leaves room for its response in the model's context (found now, not mid-run)."""
        text = build_prompt(record.prompt, num_images=1 if record.image else 0, prompt_format=self.prompt_format)
        try:
            length = len(self.processor.tokenize_prompt(text))
        except PromptTooLongError as err:
            raise RecordError(f"{where}: {err}") from None
        if length >= self.processor.max_length:
            raise RecordError(f"{where}: the prompt is {length} tokens (images expanded), leaving no room for a "
                              f"response in the context of {self.processor.max_length}: {record.prompt[:60]!r}...")

    def example(self, prompt: str, response: str, image: str | None):
        text = build_prompt(prompt, num_images=1 if image else 0, prompt_format=self.prompt_format)
        example = self.processor.training_example(text, response)
        if image:
            example.pixel_values = self.image(image)
        return example

    def batch(self, pairs: list[tuple[str, str, str | None]]) -> Batch | None:
        if not pairs:
            return None
        examples = [self.example(*pair) for pair in pairs]
        tokenizer = self.processor.tokenizer
        return Batch(**collate_for_training(examples, tokenizer.pad_id, tokenizer.image_token_id))

    def term_batches(self, harm_idx: list[int], normal_idx: list[int], step: int, position: int = 0) -> TermBatches:
        """The batches of the three terms from these records; `position` is the first harmful record's place in the
        step's whole batch."""
        records = [self.harmful[i] for i in harm_idx]
        harm_pairs = [(r.prompt, r.harmful_response, r.image) for r in records if r.harmful_response]
        if self.mismatch == "random":
            # drawn from (seed, step, the record's place in the step's batch), so a resumed run, or the same step
            # split otherwise, draws the same
            helpful_pairs = [(r.prompt, random.Random(f"{self.seed}/{step}/{position + k}").choice(
                self.normal).response, r.image) for k, r in enumerate(records)]
        else:
            helpful_pairs = [(r.prompt, r.helpful_response, r.image) for r in records if r.helpful_response]
        normal_pairs = [(self.normal[i].prompt, self.normal[i].response, self.normal[i].image) for i in normal_idx]
        if not self.ascent:
            harm_pairs = []
        return TermBatches(self.batch(harm_pairs), self.batch(helpful_pairs), self.batch(normal_pairs))
