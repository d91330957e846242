"""Visual adversarial examples (Qi et al. 2023, "Visual Adversarial Examples Jailbreak Aligned Large Language Models"):
projected gradient descent on an image's pixels that makes a corpus of target answers likely after a benign prompt.

For each clean image x0 (3, S, S) in [0, 1], already resized and cropped to the model's input resolution (CLIP's
preprocessing without its last step, `image_pixels`), and a corpus of target answers y_1 .. y_K:

    L(x)     = (1 / n) sum_{j, t} -log p( y_j,t | y_j,<t , prompt , normalize(x) )   teacher-forced NLL per target token
    x^0      = x0 + u,  u uniform over the feasible box below (the random start of each restart)
    x^{k+1}  = clip_[0,1]( Proj_{||x - x0||_inf <= eps}( x^k - alpha * sign( grad_x L(x^k) ) ) )
    result   = the iterate of lowest L over every step of every restart (the clean image included)

`normalize` (CLIP's (x - mean) / std) is inside the differentiable path, so the gradient reaches the pixels through
the frozen decoder (dense or 4-bit NF4 linears, with or without LoRA adapters), the projector and the vision tower;
every model parameter is frozen during the attack and only the pixels require grad. The model is used through its
own building blocks: `model.image_features` for the images, `ref.losses.response_hidden` (a labels mask) and the
kernel table's `linear_cross_entropy` for the NLL. Unconstrained is eps = 1.0. Qi et al.: eps 16, 32, 64 / 255 and
unconstrained, alpha = 1/255, 5000 steps, a derogatory corpus, an empty text prompt (`read_targets` reads their CSV).

On the 8-bit grid. eps and alpha must be whole multiples of 1/255 (eps = e / 255, alpha = a / 255), and the clean
image comes from 8-bit pixels (x0 = q0 / 255). The attack then runs on integer levels q, x = q / 255:

    q^{k+1} = clamp( q^k - a * sign(grad), max(0, q0 - e), min(255, q0 + e) )        integers stay integers

so every iterate, the result included, IS an 8-bit image: quantising to uint8 (the last step, `save_png`) changes
nothing, the PNG reloads (`load_png`) to the identical tensor, and ref.data's preprocessing of that PNG (what eval.py
feeds the model) equals `normalize(result.pixels)` bit for bit, so the model sees exactly the image that was
optimised. Pixels are float64 (q / 255 exactly, as ref.data computes it) and `normalize` runs in float64 then rounds
to float32, as ref.data does.

    config = PGDConfig(eps=16 / 255, steps=500)
    clean = image_pixels(processor, [image])                                            # (N, 3, S, S) float64
    result = pgd_attack(model, processor, clean, "what does the image say ?", targets, config)
    save_png(result.pixels[0], "adv.png")
    print(result.clean_nll, result.final_nll, result.seconds_per_image, result.peak_memory_mb)

For eval.py, `attack_samples` runs the attack over a suite's image samples and returns new samples whose images are
the saved adversarial PNGs (plus one JSON record per sample), to generate and judge like any attack suite, and
`expand_suites` turns a "pgd" suite of clean images into one `PGDSuite` per budget and threat model:

    transfer   the images optimised on the base (adapters off), shown to every model
    whitebox   the images optimised against the model evaluated, its adapters on (adaptive: the attacker knows the
               defence); on the base both threat models are the same images
"""

from __future__ import annotations

import contextlib
import csv
import math
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from evals.suites import AttackSample, Suite
from harness import readers
from ref import data
from ref.data import CLIP_MEAN, CLIP_STD, IGNORE_INDEX, Processor, build_prompt, collate_for_training
from harness.files import write_atomically
from ref.kernels import Kernels
from ref.losses import Batch, response_hidden

LEVELS = 255  # an 8-bit channel: pixel = level / 255, level in 0 .. 255
GRID_TOLERANCE = 1e-6  # in levels: how far from a whole level a value may be and still count as on the grid


class PGDError(ValueError):
    """A setting or input the attack cannot use (a budget off the 8-bit grid, pixels out of range, ...)."""


# ---------------------------------------------------------------------------------------------------------------------
# Settings


def whole_levels(value: float, what: str) -> int:
    """A size in [0, 1] pixel units as a whole number of 1/255 steps; refused when it is not one."""
    levels = value * LEVELS
    if not math.isfinite(levels) or abs(levels - round(levels)) > GRID_TOLERANCE * LEVELS:
        raise PGDError(f"{what} = {value!r} is not a whole multiple of 1/255 (the attack runs on the 8-bit grid); "
                       f"use k / 255")
    return int(round(levels))


@dataclass(frozen=True)
class PGDConfig:
    eps: float  # L-inf budget in [0, 1] pixel units, a multiple of 1/255; 1.0 = unconstrained
    steps: int  # gradient steps per restart
    step_size: float = 1 / 255  # alpha, a positive multiple of 1/255
    restarts: int = 1  # each from its own random start in the feasible box; the best iterate of all is kept
    seed: int = 0  # seeds the random starts
    batch_size: int = 32  # (image, target) rows per forward pass: the corpus is walked in chunks of this many rows
    random_start: bool = True  # False: every restart starts at the clean image (then restarts > 1 repeat each other)

    def __post_init__(self):
        if not 0 <= self.eps <= 1:
            raise PGDError(f"eps = {self.eps!r} must lie in [0, 1] (pixel units; 1.0 = unconstrained)")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise PGDError(f"steps = {self.steps!r} must be an integer >= 0")
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise PGDError(f"restarts = {self.restarts!r} must be an integer >= 1")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PGDError(f"batch_size = {self.batch_size!r} must be an integer >= 1")
        if self.step_levels < 1:
            raise PGDError(f"step_size = {self.step_size!r} must be at least 1/255")
        whole_levels(self.eps, "eps")  # refused off the 1/255 grid

    @property
    def eps_levels(self) -> int:
        return whole_levels(self.eps, "eps")

    @property
    def step_levels(self) -> int:
        return whole_levels(self.step_size, "step_size")

    @property
    def name(self) -> str:
        """How reports name the budget: "eps16" (16/255), ..., "unconstrained"."""
        return "unconstrained" if self.eps_levels >= LEVELS else f"eps{self.eps_levels}"


# ---------------------------------------------------------------------------------------------------------------------
# Pixels: CLIP's preprocessing split at the normalisation; 8-bit PNGs


def image_pixel_array(image: Image.Image | str | Path, image_size: int, pad_square: bool = False) -> np.ndarray:
    """ref.data.preprocess_image up to its crop: [pad to square] -> resize shortest side -> centre crop, as uint8
    (S, S, 3). The resize and crop happen here, once, on the clean image; the attack works at this resolution."""
    if not isinstance(image, Image.Image):
        image = data.load_image(image)
    else:
        data.check_image_size(image.size, getattr(image, "filename", "") or "an in-memory image")
    image = data.to_rgb(image)
    if pad_square:
        image = Image.fromarray(data.pad_to_square(np.asarray(image)))
    pixels = np.asarray(data.resize_shortest_side(image, image_size))  # (H', W', 3) uint8
    return data.center_crop(pixels, image_size)  # (S, S, 3) uint8


def levels_to_pixels(levels: np.ndarray) -> torch.Tensor:
    """uint8 (S, S, 3) -> float64 (3, S, S) = level / 255, the value ref.data computes before normalising."""
    return torch.from_numpy(levels.astype(np.float64).transpose(2, 0, 1) / LEVELS)  # (3, S, S)


def image_pixels(processor: Processor, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
    """Images -> (N, 3, S, S) float64 in [0, 1] on the 1/255 grid, at the model's input resolution: what the attack
    starts from. `normalize(image_pixels(...))` equals `processor.images_to_tensor(...)` exactly."""
    if processor.image_size is None:
        raise PGDError(f"{processor.tokenizer.source}: a text-only model's processor takes no images")
    arrays = [image_pixel_array(image, processor.image_size, processor.pad_square) for image in images]
    return torch.stack([levels_to_pixels(a) for a in arrays])  # (N, 3, S, S)


def normalize(pixels: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """CLIP's normalisation, differentiable: (x - mean) / std per channel, computed in float64 and rounded to float32
    as ref.data.preprocess_image does it (so for x = q / 255 the result equals ref.data's bit for bit).
    pixels (..., 3, S, S) in [0, 1] -> float32 (..., 3, S, S)."""
    x = pixels.double()
    mean_ = torch.tensor(mean, dtype=torch.float64, device=x.device)[:, None, None]  # (3, 1, 1)
    std_ = torch.tensor(std, dtype=torch.float64, device=x.device)[:, None, None]  # (3, 1, 1)
    return ((x - mean_) / std_).float()


def pixel_levels(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> their whole levels 0 .. 255 (float64 holding integers); refused off the 8-bit grid."""
    scaled = pixels.detach().double() * LEVELS
    levels = scaled.round()
    if scaled.numel() and (scaled - levels).abs().max() > GRID_TOLERANCE * LEVELS:
        raise PGDError("pixels are not on the 8-bit grid (level / 255): start from `image_pixels` or `load_png`")
    if scaled.numel() and (levels.min() < 0 or levels.max() > LEVELS):
        raise PGDError(f"pixels must lie in [0, 1], got [{pixels.min().item():.4g}, {pixels.max().item():.4g}]")
    return levels


def save_png(pixels: torch.Tensor, path: str | Path) -> Path:
    """Write one image (3, S, S) in [0, 1] as an 8-bit RGB PNG. Quantising to uint8 is exact for the attack's
    results (they lie on the 1/255 grid: `load_png` gives the identical tensor back); pixels off the grid are
    refused rather than rounded, so a saved PNG is always exactly what was optimised."""
    if pixels.dim() != 3 or pixels.shape[0] != 3:
        raise PGDError(f"save_png takes one image (3, S, S), got shape {tuple(pixels.shape)}")
    levels = pixel_levels(pixels).to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # (S, S, 3) uint8
    path = Path(path)
    image = Image.fromarray(levels)  # RGB
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def load_png(path: str | Path) -> torch.Tensor:
    """An image file -> (3, H, W) float64 = level / 255, as written (no resize)."""
    image = data.to_rgb(data.load_image(path))
    return levels_to_pixels(np.asarray(image))  # (3, H, W)


def read_targets(path: str | Path) -> list[str]:
    """A target corpus: a .txt (one target per line) or a .csv whose first column holds the targets, every row (Qi
    et al.'s derogatory_corpus.csv has no header). Blank targets are skipped."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                targets = [row[0] for row in csv.reader(f, strict=True) if row]
        else:
            targets = readers.jsonl_lines(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PGDError(f"{path}: cannot read the target corpus: {err}") from err
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise PGDError(f"{path}: no targets found")
    return targets


# ---------------------------------------------------------------------------------------------------------------------
# The objective: teacher-forced NLL of the corpus after the prompt and the image


def target_batch(processor: Processor, prompt: str | Sequence[str], targets: Sequence[str],
                 prompt_format: str = "llava-hf", end_with_eos: bool = False) -> Batch:
    """Teacher forcing of every target after each prompt (one `<image>` each): rows (image i, target j) at i * K + j,
    right padded, labels on the target tokens only. One prompt (a str) gives K rows.

    end_with_eos=False (Qi et al.): the target is where the answer starts, not all of it, so its closing EOS is
    not a label; True keeps ref.data's closing EOS."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not targets:
        raise PGDError("target_batch needs at least one prompt and one target")
    examples = []
    for text in prompts:
        chat = build_prompt(text, num_images=1, prompt_format=prompt_format)
        for target in targets:
            example = processor.training_example(chat, target)
            if not end_with_eos and example.input_ids[-1] == processor.tokenizer.eos_id:
                example.input_ids, example.labels = example.input_ids[:-1], example.labels[:-1]
            examples.append(example)
    batch = collate_for_training(examples, processor.tokenizer.pad_id)
    return Batch(batch["input_ids"], batch["attention_mask"], batch["labels"])  # (N * K, T) each


@dataclass
class TargetChunk:
    """Some targets for every image: one forward pass's rows, and which image each row shows."""

    batch: Batch  # (R, T)
    image_of_row: torch.Tensor  # (R,)


def target_chunks(processor: Processor, prompts: Sequence[str], targets: Sequence[str], batch_size: int,
                  prompt_format: str, end_with_eos: bool, device: torch.device) -> list[TargetChunk]:
    """The corpus cut into chunks of about `batch_size` (image, target) rows: every image sees every target once."""
    per_pass = max(1, batch_size // len(prompts))
    chunks = []
    for start in range(0, len(targets), per_pass):
        part = targets[start:start + per_pass]
        batch = target_batch(processor, prompts, part, prompt_format, end_with_eos).to(device)
        image_of_row = torch.arange(len(prompts), device=device).repeat_interleave(len(part))  # (N * k,)
        chunks.append(TargetChunk(batch, image_of_row))
    return chunks


def tokens_per_image(chunks: Sequence[TargetChunk], n_images: int) -> torch.Tensor:
    """(N,) target tokens each image's NLL averages over."""
    counts = torch.zeros(n_images, dtype=torch.float64)
    for chunk in chunks:
        labelled = (chunk.batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1).cpu()  # (R,)
        counts.index_add_(0, chunk.image_of_row.cpu(), labelled.double())
    return counts


def chunk_nll_sums(model, chunk: TargetChunk, features: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    """(N,) summed NLL of this chunk's target tokens, per image. features (N, P, D): each image's projected features,
    repeated for its rows (the vision tower ran once per image)."""
    hidden, targets = response_hidden(model, chunk.batch, image_features=features[chunk.image_of_row])  # (M, D), (M,)
    labelled = chunk.batch.labels[:, 1:] != IGNORE_INDEX  # (R, T - 1): the positions response_hidden kept
    image_of_token = chunk.image_of_row[:, None].expand_as(labelled)[labelled]  # (M,)
    weight = model.lm_head.weight  # (V, D)
    return torch.stack([kernels.linear_cross_entropy(hidden[image_of_token == i], weight,
                                                     targets[image_of_token == i], reduction="sum")
                        for i in range(features.shape[0])])  # (N,)


def corpus_nll(model, pixels: torch.Tensor, chunks: Sequence[TargetChunk], n_tokens: torch.Tensor, kernels: Kernels,
               with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """L(x) per image (N,) and, with_grad, d L / d pixels (N, 3, S, S).

    The vision tower and projector run once per step; the decoder runs chunk by chunk, each chunk's gradient
    collected on a detached copy of the image features and sent through the tower once at the end:
        d L / d x = (d features / d x)^T  sum_chunks d L_chunk / d features."""
    dtype = model.lm_head.weight.dtype
    n_tokens = n_tokens.to(pixels.device)
    with torch.set_grad_enabled(with_grad):
        x = pixels.detach().requires_grad_(with_grad)  # (N, 3, S, S) float64
        features = model.image_features(normalize(x).to(dtype))  # (N, P, D)
        features_leaf = features.detach().requires_grad_(with_grad)
        nll_sums = torch.zeros(len(pixels), dtype=torch.float64, device=pixels.device)  # (N,)
        for chunk in chunks:
            sums = chunk_nll_sums(model, chunk, features_leaf, kernels)  # (N,)
            if with_grad:
                (sums.double() / n_tokens).sum().backward()  # images are independent: the sum's gradient is each one's
            nll_sums += sums.detach().double()
        if with_grad:
            features.backward(features_leaf.grad)
    return nll_sums / n_tokens, (x.grad if with_grad else None)


@contextlib.contextmanager
def frozen(model) -> Iterator[None]:
    """Inside the block every parameter has requires_grad False and the model is in eval mode; both restored after."""
    params = list(model.parameters())
    flags, training = [p.requires_grad for p in params], model.training
    model.requires_grad_(False).eval()
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(training)


# ---------------------------------------------------------------------------------------------------------------------
# The attack


@dataclass
class AttackResult:
    pixels: torch.Tensor  # (N, 3, S, S) float64 on the 1/255 grid: each image's best iterate (or the clean image)
    clean: torch.Tensor  # (N, 3, S, S) the clean images it started from
    clean_nll: torch.Tensor  # (N,) L of the clean images (mean NLL per target token)
    final_nll: torch.Tensor  # (N,) L of `pixels`
    loss_history: torch.Tensor  # (restarts, steps + 1, N): L of every iterate, the start of each restart first
    best_restart: torch.Tensor  # (N,) the restart `pixels` comes from; -1 where no iterate beat the clean image
    seconds: float  # wall time of the whole attack (all images together)
    peak_memory_mb: float  # CUDA: peak allocated during the attack; CPU: the process's peak resident set so far
    config: PGDConfig

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / len(self.pixels)

    @property
    def linf_levels(self) -> torch.Tensor:
        """(N,) ||pixels - clean||_inf in 1/255 steps."""
        return (pixel_levels(self.pixels) - pixel_levels(self.clean)).abs().amax(dim=(1, 2, 3)).long()

    def describe(self) -> str:
        """One line for a log: budget, size of the run, mean NLL before and after, time per image, peak memory."""
        c = self.config
        return (f"pgd {c.name}: {len(self.pixels)} image(s), {c.steps} steps x {c.restarts} restart(s), target NLL "
                f"{self.clean_nll.mean().item():.4f} -> {self.final_nll.mean().item():.4f} (mean per token), "
                f"{self.seconds_per_image:.2f} s/image, peak {self.peak_memory_mb:.0f} MiB")

    def record(self, i: int) -> dict:
        """What a report keeps of image i (JSON-able)."""
        return {"clean_nll": self.clean_nll[i].item(), "adv_nll": self.final_nll[i].item(),
                "linf_levels": int(self.linf_levels[i]), "best_restart": int(self.best_restart[i]),
                "seconds_per_image": self.seconds_per_image, "peak_memory_mb": self.peak_memory_mb,
                "config": asdict(self.config), "budget": self.config.name}


def random_start(clean_levels: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """Whole levels drawn uniformly in [low, high] per pixel (the box where ||x - x0||_inf <= eps and x in [0, 1])."""
    u = torch.rand(clean_levels.shape, generator=generator, dtype=torch.float64).to(clean_levels.device)
    return low + torch.floor(u * (high - low + 1))  # (N, 3, S, S), u < 1 keeps it <= high


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def pgd_attack(model, processor: Processor, clean_pixels: torch.Tensor, prompt: str | Sequence[str],
               targets: Sequence[str], config: PGDConfig, kernels: Kernels | None = None,
               prompt_format: str = "llava-hf", end_with_eos: bool = False, progress=None) -> AttackResult:
    """Sign-gradient PGD on clean_pixels (N, 3, S, S) in [0, 1] on the 1/255 grid (from `image_pixels` or
    `load_png`), against whatever `model` is now (adapters on: the white-box attack of the model itself; a transfer
    attack optimises on the base and shows the result to the adapters: the caller's choice). `prompt`: one text
    prompt for every image, or one per image. `progress`: a harness.console.Progress counting steps, if any."""
    device = model.lm_head.weight.device
    kernels = kernels or model.kernels
    prompts = [prompt] * len(clean_pixels) if isinstance(prompt, str) else list(prompt)
    if clean_pixels.dim() != 4 or clean_pixels.shape[1] != 3 or len(prompts) != len(clean_pixels):
        raise PGDError(f"clean_pixels must be (N, 3, S, S) with one prompt per image, got {tuple(clean_pixels.shape)} "
                       f"and {len(prompts)} prompt(s)")
    if not targets:
        raise PGDError("the target corpus is empty")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()

    clean_levels = pixel_levels(clean_pixels).to(device)  # (N, 3, S, S) whole levels
    low = (clean_levels - config.eps_levels).clamp(min=0)  # the feasible box, in levels
    high = (clean_levels + config.eps_levels).clamp(max=LEVELS)
    chunks = target_chunks(processor, prompts, targets, config.batch_size, prompt_format, end_with_eos, device)
    n_tokens = tokens_per_image(chunks, len(prompts))  # (N,)
    generator = torch.Generator().manual_seed(config.seed)
    history = torch.zeros(config.restarts, config.steps + 1, len(prompts), dtype=torch.float64)
    with frozen(model):
        clean_nll, _ = corpus_nll(model, clean_levels / LEVELS, chunks, n_tokens, kernels, with_grad=False)
        best_levels, best_nll = clean_levels.clone(), clean_nll.clone()  # (N, 3, S, S), (N,)
        best_restart = torch.full((len(prompts),), -1, dtype=torch.long, device=device)
        for restart in range(config.restarts):
            levels = random_start(clean_levels, low, high, generator) if config.random_start else clean_levels.clone()
            for step in range(config.steps + 1):  # the last pass only scores the last iterate
                nll, grad = corpus_nll(model, levels / LEVELS, chunks, n_tokens, kernels, with_grad=step < config.steps)
                history[restart, step] = nll.cpu()
                better = nll < best_nll  # (N,)
                best_levels[better], best_nll[better], best_restart[better] = levels[better], nll[better], restart
                if grad is not None:
                    # x <- clip_[0,1](Proj_eps(x - alpha sign(grad))), in whole levels
                    levels = torch.minimum(torch.maximum(levels - config.step_levels * grad.sign(), low), high)
                    if progress is not None:
                        progress.update(1, f"nll {nll.mean().item():.4f} best {best_nll.mean().item():.4f}")
    return AttackResult(pixels=(best_levels / LEVELS).cpu(), clean=(clean_levels / LEVELS).cpu(),
                        clean_nll=clean_nll.cpu(), final_nll=best_nll.cpu(), loss_history=history,
                        best_restart=best_restart.cpu(), seconds=time.perf_counter() - started,
                        peak_memory_mb=peak_memory_mb(device), config=config)


# ---------------------------------------------------------------------------------------------------------------------
# For eval.py: a suite's image samples, attacked, saved, and handed back as samples


def attack_samples(model, processor: Processor, samples: Sequence[AttackSample], targets: Sequence[str],
                   config: PGDConfig, out_dir: str | Path, kernels: Kernels | None = None,
                   prompt_format: str = "llava-hf", attack_prompt: str | None = None, images_per_attack: int = 8,
                   end_with_eos: bool = False, progress=None) -> tuple[list[AttackSample], list[dict]]:
    """Attack every sample's image (with its own prompt, or `attack_prompt` for all), `images_per_attack` images per
    batched attack; write each result to out_dir/<k>.png (k = the sample's index, 4 digits) and return the samples
    with those PNGs as their images (prompt, request and category unchanged; `source["pgd"]` holds the record) and
    one record per sample: id, png, clean / adversarial NLL, L-inf in levels, restart, seconds per image, peak MB.

    The PNGs replay exactly: generating on the returned samples feeds the model the optimised tensors."""
    with_images = [s for s in samples if s.image is not None]
    if len(with_images) != len(samples) or not samples:
        raise PGDError("a pgd attack needs samples that all have an image")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    attacked, records = [], []
    for start in range(0, len(samples), images_per_attack):
        part = samples[start:start + images_per_attack]
        clean = image_pixels(processor, [s.load_image() for s in part])  # (n, 3, S, S)
        prompts = [attack_prompt if attack_prompt is not None else s.prompt for s in part]
        result = pgd_attack(model, processor, clean, prompts, targets, config, kernels, prompt_format, end_with_eos,
                            progress)
        for i, sample in enumerate(part):
            png = save_png(result.pixels[i], out_dir / f"{start + i:04d}.png")
            record = {"id": sample.id, "png": png.name, "attack_prompt": prompts[i], **result.record(i)}
            records.append(record)
            attacked.append(AttackSample(sample.id, sample.suite, sample.prompt, image=png,
                                         source={**sample.source, "pgd": record}, image_name=png.name,
                                         request=sample.request, category=sample.category,
                                         judge_context=sample.judge_context))
    return attacked, records


def pair_with_prompts(images: Sequence[AttackSample], requests: Sequence[AttackSample]) -> list[AttackSample]:
    """Qi et al.'s evaluation: each adversarial image (optimised once, with a benign prompt) shown with each text
    request of another suite (harmful instructions). Ids "<image id>+<request id>"; prompt, request and category are
    the request's, the image and `source["pgd"]` the image's."""
    return [AttackSample(f"{image.id}+{request.id}", request.suite, request.prompt, image=image.image,
                         source={**request.source, "pgd": image.source.get("pgd")}, image_name=image.image_name,
                         request=request.request, category=request.category, judge_context=request.judge_context)
            for image in images for request in requests]


# ---------------------------------------------------------------------------------------------------------------------
# For eval.py: a "pgd" suite of clean images as one attack suite per budget and threat model

THREATS = ("transfer", "whitebox")


@dataclass
class PGDSuite(Suite):
    """One attack suite of eval.py's table: the clean images of pgd suite `clean_suite` (its `samples` until they are
    attacked) at one budget under one threat model (`THREATS`)."""

    clean_suite: str = ""
    config: PGDConfig | None = None
    threat: str = "transfer"

    def attacker(self, model_name: str) -> str:
        """The model the images are optimised against when `model_name` is evaluated."""
        return "base" if self.threat == "transfer" else model_name

    def describe(self) -> dict:
        """What run.json and the report keep of it (JSON-able)."""
        c = self.config
        return {"suite": self.clean_suite, "budget": c.name, "eps_levels": c.eps_levels, "threat": self.threat,
                "steps": c.steps, "step_levels": c.step_levels, "restarts": c.restarts, "seed": c.seed}


def expand_suites(suites: Sequence[Suite], configs: Sequence[PGDConfig], threats: Sequence[str],
                  targets_file: Path | None = None) -> list[Suite]:
    """Every suite of kind "pgd" replaced, where it stood, by its attack suites "<name>_<budget>_<threat>" (budget
    by budget, each under every threat); the other suites unchanged. The target corpus joins the suite's files."""
    unknown = sorted(set(threats) - set(THREATS))
    if unknown:
        raise PGDError(f"threat model(s) {unknown}: expected {' or '.join(THREATS)}")
    expanded: list[Suite] = []
    for suite in suites:
        if suite.kind != "pgd":
            expanded.append(suite)
            continue
        files = (*(suite.files or ()), *([targets_file] if targets_file else []))
        for config in configs:
            for threat in threats:
                name = f"{suite.name}_{config.name}_{threat}"
                samples = [replace(sample, suite=name) for sample in suite.samples]
                expanded.append(PGDSuite(name, "attack", samples, suite.source, files, suite.name, config, threat))
    return expanded
