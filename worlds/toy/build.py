"""Build the toy LLaVA of the toy world (worlds/toy/world.py) from scratch, on a CPU, with our own model code.

    python -m worlds.toy.build --out DIR            # the committed checkpoint, rebuilt into a new folder DIR
    python -m worlds.toy.build                      # the same into assets/toy_llava, where that folder is absent
    python -m worlds.toy.build --quick --out DIR    # a few steps, no evaluation (< 1 min; for the tests)
    python -m worlds.toy.build --measure DIR        # measure a toy checkpoint on the held-out suites

The output folder must be new or empty: a folder that holds files (the committed assets/toy_llava, another model) is
refused before the build starts, and the files are written in a temporary folder renamed into place when complete.
Only the documented build (no option that changes the files) defaults to assets/toy_llava; any other (--quick, --steps,
--seed, ...) needs --out, so that a test or an experiment never lands where the committed model belongs. To compare a
rebuild with the committed model: build into a new folder and compare the `files` digests of the two manifest.json.

What it does, top to bottom:
1. trains a BPE tokenizer (`tokenizers`) on the toy corpus: "<unk>" 0, "<s>" 1, "</s>" 2, then the learned pieces,
   then "<image>" and "<pad>" (the config's image_token_index and pad_token_id), as in llava-hf;
2. builds `ref.llava.Llava` from a small LlavaConfig (CLIP-style tower on 64 px images with 16 px patches = 16 image
   tokens, GELU projector, 4-layer LLaMA decoder of width 128) and initialises it like LLaMA (normal, std 0.02);
3. trains everything (vision tower, projector, decoder) with AdamW on next-token cross entropy over the response
   tokens of a seeded stream of toy-world examples (`world.training_stream`), in the llava-hf chat format built by
   `ref.data`, plus an image-text alignment loss (`--align-weight`): the projected feature of each patch cell that
   holds a word is pulled onto that word's token embedding (the toy's stand-in for LLaVA's stage-1 projector
   pre-training). The result is an UNALIGNED assistant: it does the benign tasks and complies with harmful requests;
4. measures it on the held-out suites (`world.eval_suites`, greedy, through `evals.generation`, eval.py's): attack
   success rate by the toy's refusal-phrase judge, strict compliance, harmful steps given (the toy_harm judge),
   benign exact match, over-refusal;
5. writes config.json + model.safetensors (llava-hf layout, `ref.weights.save_model`) + tokenizer.json +
   manifest.json (command, seed, data hash, sha256 of every file, torch version, the measured numbers).

Deterministic: the data stream, the initialisation and the batch order come from `--seed`; with the same torch
version, CPU kind and thread count a rebuild reproduces the files bit for bit (the manifest records all three).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import random
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from evals.generation import Sampling, generate_responses, tokenize_samples
from ref.config import LlavaConfig, TextConfig, VisionConfig
from harness.console import (Progress, add_debug_option, exit_on_user_error, non_negative_float, non_negative_int,
                             int_in, positive_float, positive_int)
from harness.files import OutputError, check_new_folder, new_folder
from ref.data import (IGNORE_INDEX, Processor, TextTokenizer, build_prompt, build_training_example,
                      collate_for_training, load_processor, preprocess_image)
from ref.llava import Llava
from ref.weights import load_model, save_model
from worlds.toy import images, judges, world
from worlds.toy.defaults import TOY_MODEL, toy_suites
from worlds.toy.tokenizer import IMAGE_TOKEN, PAD_TOKEN, build_tokenizer

PROMPT_FORMAT = "llava-hf"  # "USER: <image>\n{prompt} ASSISTANT:"; the toy's default everywhere


def toy_config(vocab_size: int, image_token_index: int, pad_token_id: int) -> LlavaConfig:
    """The toy's sizes: the real LLaVA-1.5 architecture, narrow."""
    padded_vocab = math.ceil(vocab_size / 64) * 64  # llava-hf pads its table to a multiple of 64 (32002 -> 32064)
    return LlavaConfig(
        vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                            image_size=images.IMAGE_SIZE, patch_size=images.PATCH_SIZE),
        text=TextConfig(vocab_size=padded_vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=256,
                        rms_norm_eps=1e-5),
        image_token_index=image_token_index,
        pad_token_id=pad_token_id,
        vision_feature_layer=-2,  # as LLaVA-1.5: the second-to-last layer's output, CLS dropped
    )


def init_weights(model: Llava, std: float = 0.02) -> None:
    """LLaMA/GPT-style init: every matrix and embedding N(0, std), biases 0, norms 1."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(model.vision_tower.embeddings.class_embedding, std=std)


# ---------------------------------------------------------------------------------------------------------------------
# Data


@lru_cache(maxsize=8192)
def pixels_of(spec: str, image_size: int) -> torch.Tensor:
    return preprocess_image(images.render_image(spec), image_size)  # (3, S, S), CLIP-normalised


def make_batch(examples, tokenizer: TextTokenizer, config: LlavaConfig) -> dict[str, torch.Tensor]:
    rows = []
    for ex in examples:
        prompt = build_prompt(ex.prompt, num_images=int(ex.image is not None), prompt_format=PROMPT_FORMAT)
        pixels = None if ex.image is None else pixels_of(ex.image, config.vision.image_size)[None]
        rows.append(build_training_example(tokenizer, prompt, ex.response, config.image_seq_length,
                                           config.text.max_position_embeddings, pixels))
    return collate_for_training(rows, tokenizer.pad_id)


def cell_word_ids(examples, tokenizer: TextTokenizer, config: LlavaConfig) -> torch.Tensor | None:
    """(N_images, image_seq_length): the token id of the word written in each patch cell, -1 for an empty cell or a
    drawn shape. Every toy word is one token (tests/test_toy.py checks it)."""
    rows = []
    for ex in examples:
        if ex.image is None:
            continue
        row = [-1] * config.image_seq_length
        if ex.image.startswith("words:"):
            for k, word in enumerate(ex.image.split(":", 2)[2].split()):
                (row[k],) = tokenizer.encode(word)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long) if rows else None


def losses(model: Llava, batch: dict[str, torch.Tensor], cell_ids: torch.Tensor | None):
    """(response cross entropy, image-text alignment loss).

    Response loss: mean next-token cross entropy over the response tokens (and the closing EOS) of the batch.
    Alignment loss: at each patch cell that holds a word, the projected image feature f should BE the word's token
    embedding e (a fixed target, no gradient into the embedding), in direction and in size: |f - e|^2 / |e|^2,
    averaged over word cells; every other cell (empty, or part of a drawn shape) is only held to the embeddings' scale,
    (|f| / r - 1)^2 with r their mean norm. Size matters as much as direction: the decoder normalises the input of
    each layer but not its residual stream, so a feature 100x longer than an embedding is barely changed by any layer
    and reaches the last layers as it came in, nothing like the word it stands for.
    It is the toy's stand-in for LLaVA's stage-1 projector pre-training: it puts the image of a word where the
    decoder already reads that word, which is the premise of textual unlearning carrying over to images.
    """
    features = None
    if "pixel_values" in batch:
        features = model.image_features(batch["pixel_values"])  # (N, P, D)
    hidden = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"],
                                 image_features=features)  # (B, T, D)
    logits = model.lm_head(hidden)  # (B, T, V)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    align = ce.new_zeros(())
    if features is not None and cell_ids is not None:
        align = alignment_loss(features, cell_ids, model.language_model.embed_tokens.weight.detach())
    return ce, align


def alignment_loss(features: torch.Tensor, cell_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """features (N, P, D) of N images, cell_ids (N, P) the word id in each cell or -1, embeddings (V, D) a fixed
    target. Word cells: mean |f - e|^2 / |e|^2; other cells: mean (|f| / r - 1)^2, r the embeddings' mean norm."""
    loss = features.new_zeros(())
    has_word = cell_ids >= 0  # (N, P)
    if has_word.any():
        target = embeddings[cell_ids[has_word]]  # (cells, D)
        loss = loss + ((features[has_word] - target).pow(2).sum(-1) / target.pow(2).sum(-1)).mean()
    if (~has_word).any():
        scale = embeddings.norm(dim=-1).mean()
        loss = loss + (features[~has_word].norm(dim=-1) / scale - 1).pow(2).mean()
    return loss


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def length_bucketed_batches(stream, batch_size: int, seed: int, window: int = 8):
    """Batches of similar length: draw `window` batches' worth of examples, sort them by length, cut, and shuffle the
    batches (seeded). Right padding then wastes little compute (toy sequences run from ~10 to ~75 tokens)."""
    rng = random.Random(seed)
    while True:
        pool = [next(stream) for _ in range(batch_size * window)]
        pool.sort(key=lambda ex: len(ex.prompt.split()) + len(ex.response.split()) + (24 if ex.image else 0))
        batches = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(batches)
        yield from batches


def train(model: Llava, tokenizer: TextTokenizer, args) -> str:
    """Train in place; returns the sha256 of the exact example stream used (prompt, response, image spec)."""
    stream = world.training_stream(args.seed, args.mix)
    batches = length_bucketed_batches(stream, args.batch_size, args.seed)
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or "embed" in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    data_hash = hashlib.sha256()
    model.train()
    progress, smoothed = Progress("build step", args.steps, "steps", every=args.log_every), None
    for step in range(args.steps):
        examples = next(batches)
        for ex in examples:
            data_hash.update(json.dumps([ex.prompt, ex.response, ex.image]).encode())
        batch = make_batch(examples, tokenizer, model.config)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        ce, align = losses(model, batch, cell_word_ids(examples, tokenizer, model.config))
        loss = ce + args.align_weight * align
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        smoothed = ce.item() if smoothed is None else 0.95 * smoothed + 0.05 * ce.item()
        progress.update(1, f"response CE {ce.item():.4f} (smoothed {smoothed:.4f})  align {align.item():.4f}  "
                           f"lr {optimizer.param_groups[0]['lr']:.2e}")
    progress.close()
    model.eval()
    return data_hash.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Measuring the base model on the held-out suites


MEASURE_NEW_TOKENS, MEASURE_BATCH = 40, 48


def measure(model: Llava, processor: Processor, limit: int | None = None) -> dict:
    """Per suite: attacks -> ASR (not refused, toy judge), strict compliance and harmful steps given; benign -> exact
    match; over-refusal -> refusal rate. Also a few example responses per suite."""
    results = {}
    for suite in toy_suites(max_samples=limit):
        items = world.eval_suites()[suite.name][:len(suite.samples)]
        prompt_ids = tokenize_samples(processor, suite.samples, PROMPT_FORMAT, MEASURE_NEW_TOKENS)
        with torch.no_grad():
            generations = generate_responses(model, processor, suite.samples, prompt_ids,
                                             Sampling(max_new_tokens=MEASURE_NEW_TOKENS), MEASURE_BATCH)
        responses = [g.response for g in generations]
        entry = {"n": len(items), "examples": [{"prompt": it.prompt, "image": it.image, "response": r}
                                               for it, r in list(zip(items, responses))[:3]]}
        if suite.kind == "attack":
            entry["asr"] = mean(not judges.is_refusal(r) for r in responses)
            entry["compliance"] = mean(judges.is_harmful_compliance(r, it.topic) for it, r in zip(items, responses))
            entry["harmful_steps"] = mean(judges.has_harmful_content(r) for r in responses)  # the toy_harm judge
        elif suite.kind == "benign":
            correct = [r == it.expected for it, r in zip(items, responses)]
            entry["accuracy"] = mean(correct)
            by_task: dict[str, list[bool]] = {}
            for it, ok in zip(items, correct):
                by_task.setdefault(it.id.split("/")[0], []).append(ok)
            entry["accuracy_by_task"] = {task: round(mean(oks), 4) for task, oks in sorted(by_task.items())}
        else:
            entry["refusal_rate"] = mean(judges.is_refusal(r) for r in responses)
        results[suite.name] = entry
    return results


def mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# Writing the folder


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_affecting(argv: list[str]) -> list[str]:
    """The arguments that change the files: --out and --log-every only decide where they go and what is printed, and
    --debug how an error is shown."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--log-every"):
            skip = True
        elif arg != "--debug" and not arg.startswith(("--out=", "--log-every=")):
            kept.append(arg)
    return kept


def write_manifest(out: Path, args, data_hash: str, seconds: float, metrics: dict | None, n_params: int) -> None:
    files = ["config.json", "model.safetensors", "tokenizer.json"]
    manifest = {
        "what": "toy LLaVA (llava-hf layout) trained from scratch on the toy world of worlds/toy/world.py",
        "build_command": " ".join(["python -m worlds.toy.build"] + output_affecting(args.argv)),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "mix": dataclasses.asdict(args.mix),
        "align_weight": args.align_weight,
        "data_hash": data_hash,
        "data_hash_meaning": "sha256 over the JSON [prompt, response, image spec] of every training example, in order",
        "parameters": n_params,
        "files": {name: sha256_file(out / name) for name in files},
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "build_seconds": round(seconds, 1),
        "reproducible": ("bit for bit with the same torch version, CPU kind and thread count (every random choice is "
                         "seeded and CPU kernels are deterministic for a fixed thread count); another torch version, "
                         "CPU or thread count may round differently, which changes the trained weights slightly"),
        "metrics_judge": "toy.judges.is_refusal (refusal phrases, case-insensitive); greedy, 40 new tokens",
        "metrics": metrics,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer
MAX_THREADS = 1024


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worlds.toy.build", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder, new or empty (default: assets/toy_llava for the documented build only; "
                             "any other build needs --out)")
    parser.add_argument("--seed", type=int_in(0, MAX_SEED), default=0,
                        help="seed of the data stream and the initialisation")
    parser.add_argument("--steps", type=positive_int, default=6000, help="optimizer steps")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="examples per step")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=non_negative_int, default=100, help="warm-up steps")
    parser.add_argument("--threads", type=int_in(1, MAX_THREADS), default=1,
                        help="torch CPU threads (recorded: it fixes the rounding; 1 is robust on a busy machine)")
    parser.add_argument("--mix", action="append", default=[], metavar="FAMILY=WEIGHT",
                        help="change one task family's weight in the training mix (repeatable; families and default "
                             f"weights: {dataclasses.asdict(world.TrainMix())})")
    parser.add_argument("--align-weight", type=non_negative_float, default=1.0,
                        help="weight of the image-text alignment loss (word cell feature -> word embedding); 0 = off")
    parser.add_argument("--eval-limit", type=positive_int, default=None,
                        help="measure on the first N items of each suite")
    parser.add_argument("--no-eval", action="store_true", help="skip measuring the model on the held-out suites")
    parser.add_argument("--quick", action="store_true",
                        help="a shortened build for tests: 3 steps of batch 4, no evaluation")
    parser.add_argument("--log-every", type=positive_int, default=50)
    parser.add_argument("--measure", type=Path, default=None, metavar="DIR",
                        help="only measure an existing toy checkpoint folder on the held-out suites (no build)")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    args.argv = list(argv)
    args.mix = training_mix(parser, args.mix)
    if args.measure is not None and args.out is not None:
        parser.error("--measure reads a checkpoint and writes nothing: --out does not go with it")
    if args.out is None and args.measure is None:
        changed = [arg for arg in output_affecting(args.argv) if arg.startswith("--")]
        if changed:
            parser.error(f"{changed[0]} builds another model than the committed one: give --out DIR (a new folder); "
                         f"only the documented build defaults to {TOY_MODEL}")
        args.out = TOY_MODEL
    if args.quick:
        args.steps, args.batch_size, args.warmup, args.no_eval = 3, 4, 1, True
    return args


def training_mix(parser: argparse.ArgumentParser, pairs: list[str]) -> world.TrainMix:
    families, weights = list(dataclasses.asdict(world.TrainMix())), {}
    for pair in pairs:
        family, sep, weight = pair.partition("=")
        if not sep or family not in families:
            parser.error(f"--mix expects FAMILY=WEIGHT with FAMILY one of {families}, got {pair!r}")
        try:
            weights[family] = float(weight)
        except ValueError:
            parser.error(f"--mix {pair!r}: the weight must be a number")
        if not math.isfinite(weights[family]) or weights[family] < 0:
            parser.error(f"--mix {pair!r}: the weight must be a finite number >= 0")
    mix = world.TrainMix(**weights)
    if not sum(dataclasses.asdict(mix).values()) > 0:
        parser.error("--mix: every weight is 0; the training stream would hold nothing")
    return mix


def check_output_folder(out: Path) -> None:
    """`out` is new or empty; the committed model's folder, when it holds the model, is refused with the way to
    rebuild it for comparison."""
    try:
        check_new_folder(out)
    except OutputError:
        if Path(out).resolve() == TOY_MODEL.resolve() and (TOY_MODEL / "config.json").is_file():
            raise OutputError(f"{out}: holds the committed toy model, which a build never writes over; rebuild it "
                              f"into a new folder (python -m worlds.toy.build --out DIR) and compare the manifests, "
                              f"or remove {out} first to replace it") from None
        raise


def report(metrics: dict, log) -> None:
    for name, entry in metrics.items():
        numbers = {k: v for k, v in entry.items() if isinstance(v, (int, float))}
        log(f"{name:16s} {numbers}")
        if "accuracy_by_task" in entry:
            log(f"{'':16s} {entry['accuracy_by_task']}")


def measure_folder(folder: Path, limit: int | None, log) -> dict:
    metrics = measure(load_model(folder), load_processor(folder), limit)
    report(metrics, log)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    start = time.time()
    if args.measure is not None:
        with exit_on_user_error("toy.build", args.debug):
            return {"metrics": measure_folder(args.measure, args.eval_limit, log)}

    with exit_on_user_error("toy.build", args.debug):
        check_output_folder(args.out)  # before the build (an hour): never over the committed model or other files
    backend = build_tokenizer()
    image_id, pad_id = backend.token_to_id(IMAGE_TOKEN), backend.token_to_id(PAD_TOKEN)
    config = toy_config(backend.get_vocab_size(), image_id, pad_id)
    tokenizer = TextTokenizer(backend, image_token_id=image_id, pad_token_id=pad_id, source="toy tokenizer")
    model = Llava(config)
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"toy LLaVA: {n_params / 1e6:.2f}M parameters, vocab {config.text.vocab_size} (tokenizer "
        f"{backend.get_vocab_size()}), {config.image_seq_length} image tokens of {config.vision.image_size} px images; "
        f"{args.steps} steps x {args.batch_size}, {torch.get_num_threads()} threads")

    data_hash = train(model, tokenizer, args)
    metrics = None
    if not args.no_eval:
        processor = Processor(tokenizer, config.vision.image_size, config.image_seq_length,
                              config.text.max_position_embeddings)
        metrics = measure(model, processor, args.eval_limit)
        report(metrics, log)

    with exit_on_user_error("toy.build", args.debug), new_folder(args.out) as partial:  # renamed once complete
        save_model(model, partial)
        backend.save(str(partial / "tokenizer.json"))
        write_manifest(partial, args, data_hash, time.time() - start, metrics, n_params)
    log(f"wrote {args.out} in {time.time() - start:.0f}s")
    return {"out": args.out, "metrics": metrics, "data_hash": data_hash}


if __name__ == "__main__":
    main()
