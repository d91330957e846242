"""The SmolLM2 world's eyes: a small CLIP tower + projector that read typographic images; the decoder stays frozen.

    python -m worlds.smollm2.vision build --model models/smollm2 --data data/smollm2 --out assets/smollm2_vision
    python -m worlds.smollm2.vision join --model models/smollm2 --out models/smollm2-llava   # a LLaVA folder

The paper's mechanism in its plainest form. LLaVA's projector is pre-trained to put image features where the decoder
already reads language; then anything the decoder learns from text alone reaches the images too. Here, literally:

- an image is an 8 x 8 grid of 36 px cells; each cell shows one token of the text, in reading order, drawn in
  Pillow's built-in 6 x 11 bitmap font (up to three lines of six characters; the same pixels on every machine), and
  a newline starts the next row of cells;
- the tokens are SmolLM2's own: the text is tokenized as the decoder reads it, and a token outside the first
  IMAGE_VOCAB_IDS ids (the most frequent merges) or not printable ASCII is split into such pieces by SmolLM2's BPE
  restricted to them (`CellPainter.pieces`), so a rare word is drawn as several common pieces;
- the tower (2 CLIP layers, width 384) and projector are trained so that the projected feature of each cell is the
  token's embedding in the frozen decoder (toy.build.alignment_loss: |f - e|^2 / |e|^2 on token cells, the
  embeddings' scale on empty cells), plus a cross entropy of reading each cell as its token by cosine similarity
  among the batch's tokens and NEGATIVES sampled others (`reading_loss`: the squared error alone left the tower at a
  relative error of ~0.7 after 500 steps, still unable to tell tokens apart); the language-model loss through the
  30-layer decoder is not used (too slow for the hour on one core this build is allowed).

A limit of the drawing: a word-start token and the same letters without the space (" the" / "the") draw the same
cell, so the tower cannot tell them apart (2132 such pairs, 27% of the drawable pieces); every held-out misreading of
the committed build is one of them.

Training images: half are windows of the world's own training text (the unlearning records of data/smollm2: AdvBench
train prompts and the answers to them, TruthfulQA's train rows), half are cells of uniformly drawn vocabulary pieces.
Held out: the AdvBench validation prompts, drawn as images; the manifest records how many of their cells the tower
reads as the right token (nearest embedding by cosine) and the relative error.

Written: vision.safetensors (`vision_tower.*`, `multi_modal_projector.*` in llava-hf names, float16), config.json
(the vision config and image layout), manifest.json (command, seed, steps, time, held-out reading accuracy, sha256).
`join` puts it beside the decoder in one LLaVA folder (llava-hf layout) that train.py and eval.py load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import shutil
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import tokenizers
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file

from ref.config import LlavaConfig, VisionConfig, load_config, read_json
from harness.console import (Progress, add_debug_option, exit_on_user_error, int_in, non_negative_float,
                             non_negative_int, positive_float, positive_int)
from harness.readers import read_csv, require_columns
from ref.data import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN
from harness.files import check_new_folder, new_folder
from ref.llava import Llava
from harness.provenance import sha256_file
from harness.unlearning_data import read_unlearning_jsonl
from ref.unlearning_data import HarmfulRecord
from ref.weights import load_state_dict, open_checkpoint, save_model
from worlds.toy.build import MAX_SEED, MAX_THREADS, alignment_loss, init_weights, learning_rate

CELL = 36                      # px, one token per cell (= the tower's patch size)
GRID = 8                       # cells per side: 64 image tokens
IMAGE_SIZE = CELL * GRID       # 288 px
CHARS_PER_LINE, LINES = 6, 3   # a cell holds 18 characters of the 6 x 11 bitmap font
GLYPH_W, GLYPH_H = 6, 11
IMAGE_VOCAB_IDS = 16384        # the tower reads SmolLM2 pieces with ids below this
INK, PAPER = (0, 0, 0), (255, 255, 255)
NEGATIVES = 4096               # other drawable pieces each reading-loss step compares a cell against
VISION_FILE, CONFIG_FILE = "vision.safetensors", "config.json"
VISION_ASSET = Path(__file__).resolve().parents[2] / "assets" / "smollm2_vision"  # the committed build


def vision_config() -> VisionConfig:
    return VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=6,
                        image_size=IMAGE_SIZE, patch_size=CELL)


# ---------------------------------------------------------------------------------------------------------------------
# Cells: which pieces, how they are drawn


def visible_text(piece: str) -> str:
    """What a cell shows for a decoded piece: its text without the leading space that marks a word start."""
    return piece[1:] if piece.startswith(" ") else piece


def drawable(text: str) -> bool:
    return 0 < len(text) <= CHARS_PER_LINE * LINES and text.isascii() and text.isprintable() and " " not in text


def cell_tokenizer(tokenizer_json: str | Path, max_id: int = IMAGE_VOCAB_IDS) -> tokenizers.Tokenizer:
    """SmolLM2's BPE restricted to the drawable pieces below `max_id` (ids unchanged).

    BPE applies merges in rank order, so dropping every merge whose result is not kept gives the segmentation the
    full tokenizer would give if its vocabulary ended there; the single-byte pieces stay, so any text is encodable.
    """
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    full = tokenizers.Tokenizer.from_str(json.dumps(spec))
    vocab = spec["model"]["vocab"]
    keep = {piece: i for piece, i in vocab.items()
            if len(piece) == 1 or (i < max_id and drawable(visible_text(full.decode([i]))))}
    merges = [m for m in spec["model"]["merges"] if _merged(m) in keep and all(p in keep for p in _parts(m))]
    spec["model"]["vocab"], spec["model"]["merges"] = keep, merges
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in keep]
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def _parts(merge) -> list[str]:
    return merge.split(" ") if isinstance(merge, str) else list(merge)


def _merged(merge) -> str:
    return "".join(_parts(merge))


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()  # the bitmap font inside Pillow: no installed font involved


def cell_mask(text: str) -> np.ndarray:
    """(CELL, CELL) bool, ink where `text` (1..18 printable ASCII characters, no space) is drawn, centred, in lines of
    six."""
    if not drawable(text):
        raise ValueError(f"piece {text!r} cannot be drawn in one cell (1..{CHARS_PER_LINE * LINES} printable ASCII "
                         f"characters, no space)")
    lines = [text[i:i + CHARS_PER_LINE] for i in range(0, len(text), CHARS_PER_LINE)]
    image = Image.new("L", (CELL, CELL), 0)
    draw = ImageDraw.Draw(image)
    top = (CELL - GLYPH_H * len(lines)) // 2
    for k, line in enumerate(lines):
        draw.text(((CELL - GLYPH_W * len(line)) // 2, top + k * GLYPH_H), line, fill=255, font=_font())
    return np.asarray(image) > 127


@dataclasses.dataclass
class Layout:
    """Which piece id sits in each of the GRID x GRID cells (row-major), -1 for an empty cell."""

    ids: list[int]


def layout_text(text: str, painter: "CellPainter") -> Layout:
    """One piece per cell in reading order; each line of `text` starts a new row of cells."""
    ids, row = [-1] * (GRID * GRID), 0
    for line in text.split("\n"):
        pieces = painter.pieces(" ".join(line.split())) if line.strip() else []
        for k in range(0, max(len(pieces), 1), GRID):
            if row >= GRID:
                raise ValueError(f"text does not fit {GRID} rows of {GRID} cells: {text!r}")
            for col, piece in enumerate(pieces[k:k + GRID]):
                ids[row * GRID + col] = piece
            row += 1
    return Layout(ids)


class CellPainter:
    """Draws layouts: every drawable piece's cell mask is made once; an image is masks placed on a grid.

    `full` is SmolLM2's tokenizer, `cells` the restricted one (`cell_tokenizer`) that splits what a cell cannot show.
    """

    def __init__(self, full: tokenizers.Tokenizer, cells: tokenizers.Tokenizer):
        self.full, self.tokenizer = full, cells
        self.ids = sorted(i for i in cells.get_vocab().values() if drawable(visible_text(cells.decode([i]))))
        self.row_of = {piece: k for k, piece in enumerate(self.ids)}
        masks = [cell_mask(visible_text(cells.decode([i]))) for i in self.ids]
        self.masks = torch.from_numpy(np.stack(masks + [np.zeros((CELL, CELL), bool)]))  # (n_pieces + 1, C, C)
        ink, paper = normalised(INK), normalised(PAPER)
        self.ink, self.paper = ink[:, None, None, None], paper[:, None, None, None]  # (3, 1, 1, 1)

    def pieces(self, text: str) -> list[int]:
        """`text` as the decoder's tokens, each one the tower cannot show re-split by the restricted BPE."""
        ids = []
        for token in self.full.encode(text, add_special_tokens=False).ids:
            ids += [token] if token in self.row_of else self.tokenizer.encode(
                self.full.decode([token]), add_special_tokens=False).ids
        return [i for i in ids if i in self.row_of]  # a bare space or a non-ASCII byte is not drawn

    def check(self, layout: Layout, what: str) -> None:
        bad = [i for i in layout.ids if i >= 0 and i not in self.row_of]
        if bad:
            raise ValueError(f"{what}: pieces {[self.tokenizer.decode([i]) for i in bad]} cannot be drawn in a cell")

    def pixels(self, layouts: list[Layout]) -> torch.Tensor:
        """(N, 3, S, S) CLIP-normalised pixels, equal to ref.data.preprocess_image of `image()`."""
        for layout in layouts:
            self.check(layout, "pixels")
        blank = len(self.ids)
        rows = torch.tensor([[self.row_of.get(i, blank) if i >= 0 else blank for i in lay.ids] for lay in layouts])
        masks = self.masks[rows].view(len(layouts), GRID, GRID, CELL, CELL)  # (N, gy, gx, y, x)
        masks = masks.permute(0, 1, 3, 2, 4).reshape(len(layouts), 1, IMAGE_SIZE, IMAGE_SIZE)  # (N, 1, S, S)
        return torch.where(masks, self.ink.view(1, 3, 1, 1), self.paper.view(1, 3, 1, 1))  # (N, 3, S, S)

    def image(self, layout: Layout) -> Image.Image:
        self.check(layout, "image")
        blank = len(self.ids)
        masks = self.masks[[self.row_of[i] if i >= 0 else blank for i in layout.ids]].numpy()  # (G*G, C, C)
        grid = masks.reshape(GRID, GRID, CELL, CELL).transpose(0, 2, 1, 3).reshape(IMAGE_SIZE, IMAGE_SIZE)
        pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        pixels[:] = PAPER
        pixels[grid] = INK
        return Image.fromarray(pixels, "RGB")


def read_tokenizer(model_dir: str | Path) -> tokenizers.Tokenizer:
    """`model_dir/tokenizer.json`, or an error naming it (the tokenizers library's own names no file)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (the folder python -m weights_tools.smollm2 wrote has one)")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception for a malformed file
        raise ValueError(f"{path}: not a tokenizers JSON file ({err})") from None


def painter_for(model_dir: str | Path, max_id: int = IMAGE_VOCAB_IDS) -> CellPainter:
    return CellPainter(read_tokenizer(model_dir), cell_tokenizer(Path(model_dir) / "tokenizer.json", max_id))


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    """(3,) float32: one colour as CLIP preprocessing leaves it (computed in float64 like ref.data)."""
    value = (np.asarray(rgb, np.float64) / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    return torch.from_numpy(value.astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------------
# The model: tower + projector of a LLaVA whose decoder is SmolLM2 (built on the meta device: never run here)


def llava_config(model_dir: str | Path) -> LlavaConfig:
    """The text-only SmolLM2 config with this tower. `<image>` is the tokenizer's, or else the id just past its
    vocabulary (where ref.data adds it, as the original LLaVA release does); the decoder never looks it up: image
    features take its place."""
    tokenizer = read_tokenizer(model_dir)
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    return dataclasses.replace(load_config(model_dir), vision=vision_config(), vision_feature_layer=-1,
                               image_token_index=tokenizer.get_vocab_size(with_added_tokens=True) if image_id is None
                               else image_id)


def vision_side(config: LlavaConfig, seed: int) -> Llava:
    """A Llava whose tower and projector are real (LLaMA-style init, seeded) and whose decoder is on `meta`."""
    with torch.device("meta"):
        model = Llava(config)
    model.vision_tower.to_empty(device="cpu")
    model.multi_modal_projector.to_empty(device="cpu")
    torch.manual_seed(seed)
    init_weights(_VisionOnly(model))
    return model


class _VisionOnly(torch.nn.Module):
    """The tower and projector of `model` as one module (for init_weights and the optimiser)."""

    def __init__(self, model: Llava):
        super().__init__()
        self.vision_tower, self.multi_modal_projector = model.vision_tower, model.multi_modal_projector


def vision_state(model: Llava) -> dict[str, torch.Tensor]:
    return {name: tensor.detach() for name, tensor in _VisionOnly(model).state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# Data


def training_texts(data_dir: Path) -> list[str]:
    """The world's training text: every prompt and response of data/smollm2/unlearning_templated.jsonl, ASCII only
    (the committed tower was built on round one's records, which that file keeps)."""
    texts = []
    for record in read_unlearning_jsonl(data_dir / "unlearning_templated.jsonl"):
        if isinstance(record, HarmfulRecord):
            parts = (record.prompt, record.harmful_response, record.helpful_response)
        else:
            parts = (record.prompt, record.response)
        texts += [text.encode("ascii", "ignore").decode() for text in parts if text and text.strip()]
    return texts


def window_layout(text: str, painter: CellPainter, rng: random.Random) -> Layout:
    """A random run of whole words from `text`, laid out from the first cell (lines kept), cut where the grid ends."""
    words = text.replace("\n", " \n ").split(" ")
    start = rng.randrange(len(words))
    ids, row, col = [-1] * (GRID * GRID), 0, 0
    for word in words[start:]:
        if word == "\n":
            row, col = row + 1, 0
            continue
        for piece in painter.pieces((" " if col else "") + word) if word else []:
            if col == GRID:
                row, col = row + 1, 0
            if row >= GRID:
                return Layout(ids)
            ids[row * GRID + col], col = piece, col + 1
    return Layout(ids)


def random_layout(pieces: list[int], rng: random.Random) -> Layout:
    """Cells filled with uniformly drawn pieces, a random fraction of them left empty."""
    fill = rng.uniform(0.3, 1.0)
    return Layout([rng.choice(pieces) if rng.random() < fill else -1 for _ in range(GRID * GRID)])


def training_batch(texts: list[str], painter: CellPainter, rng: random.Random, size: int) -> list[Layout]:
    return [window_layout(rng.choice(texts), painter, rng) if k % 2 == 0
            else random_layout(painter.ids, rng) for k in range(size)]


# ---------------------------------------------------------------------------------------------------------------------
# Training and measuring


def cell_targets(layouts: list[Layout]) -> torch.Tensor:
    return torch.tensor([lay.ids for lay in layouts], dtype=torch.long)  # (N, G*G), -1 = empty


def train(model: Llava, embeddings: torch.Tensor, painter: CellPainter, texts: list[str], args) -> None:
    parameters = list(_VisionOnly(model).parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng = random.Random(args.seed)
    progress = Progress("vision step", args.steps, "steps", every=args.log_every)
    for step in range(args.steps):
        layouts = training_batch(texts, painter, rng, args.batch_size)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        features = model.image_features(painter.pixels(layouts))  # (N, G*G, D)
        targets = cell_targets(layouts)
        negatives = torch.tensor(rng.sample(painter.ids, min(NEGATIVES, len(painter.ids))))
        align = alignment_loss(features, targets, embeddings)
        read = reading_loss(features, targets, embeddings, negatives)
        loss = align + args.read_weight * read
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        progress.update(1, f"alignment {align.item():.4f}  reading CE {read.item():.4f}")
    progress.close()


def reading_loss(features: torch.Tensor, cell_ids: torch.Tensor, embeddings: torch.Tensor, negatives: torch.Tensor,
                 temperature: float = 0.05) -> torch.Tensor:
    """Cross entropy of reading each token cell as its token, by cosine similarity of the feature to the embeddings
    (/ temperature) of the batch's tokens and the sampled `negatives` (ids): the discriminative signal that the squared
    error alone gives weakly. (The whole vocabulary would cost a 49152-way product per cell, 3x a step.)"""
    has_token = cell_ids >= 0  # (N, P)
    if not has_token.any():
        return features.new_zeros(())
    candidates, target = torch.unique(torch.cat([cell_ids[has_token], negatives]), return_inverse=True)
    target = target[:int(has_token.sum())]  # each cell's token among the candidates
    unit = torch.nn.functional.normalize
    logits = unit(features[has_token], dim=-1) @ unit(embeddings[candidates], dim=-1).T / temperature  # (cells, C)
    return torch.nn.functional.cross_entropy(logits, target)


@torch.no_grad()
def reading_accuracy(model: Llava, embeddings: torch.Tensor, painter: CellPainter, texts: list[str]) -> dict:
    """On `texts` drawn as images: the fraction of token cells whose feature's nearest embedding (cosine, whole
    vocabulary) is the drawn token, and the mean relative error |f - e|^2 / |e|^2."""
    layouts = [layout_text(text, painter) for text in texts]
    features = torch.cat([model.image_features(painter.pixels(layouts[k:k + 64])) for k in range(0, len(layouts), 64)])
    ids = cell_targets(layouts)
    has_token = ids >= 0
    cells, target = features[has_token], ids[has_token]  # (n, D), (n,)
    unit = torch.nn.functional.normalize
    nearest = (unit(cells, dim=-1) @ unit(embeddings, dim=-1).T).argmax(-1)  # (n,)
    wanted = embeddings[target]
    error = ((cells - wanted).pow(2).sum(-1) / wanted.pow(2).sum(-1)).mean()
    return {"images": len(texts), "token_cells": int(has_token.sum()),
            "nearest_is_token": round(float((nearest == target).float().mean()), 4),
            "relative_error": round(float(error), 4)}


def heldout_texts(data_dir: Path) -> list[str]:
    columns, rows = read_csv(data_dir / "advbench_val.csv")
    require_columns(data_dir / "advbench_val.csv", columns, ["goal"])
    return [row["goal"] for row in rows]


# ---------------------------------------------------------------------------------------------------------------------
# Files


def save_vision(model: Llava, out: Path, manifest: dict) -> None:
    state = {name: tensor.to(torch.float16).contiguous() for name, tensor in vision_state(model).items()}
    save_file(state, str(out / VISION_FILE))
    config = {"vision_config": dataclasses.asdict(vision_config()), "vision_feature_layer": -1,
              "cell": CELL, "grid": GRID, "image_vocab_ids": IMAGE_VOCAB_IDS, "dtype": "float16"}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    manifest["files"] = {name: sha256_file(out / name) for name in (VISION_FILE, CONFIG_FILE)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def check_vision_folder(folder: Path) -> None:
    missing = [name for name in (VISION_FILE, CONFIG_FILE, "manifest.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: no {', '.join(missing)}: not a folder python -m worlds.smollm2.vision build "
                                f"wrote")


def load_vision(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tower + projector tensors of a folder this module wrote, float32, llava-hf names."""
    path = Path(folder) / VISION_FILE
    check_vision_folder(Path(folder))
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a truncated or corrupt file
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    return {name: tensor.float() for name, tensor in state.items()}


def join(model_dir: str | Path, vision_dir: str | Path, out: str | Path) -> Path:
    """A LLaVA folder (llava-hf layout): SmolLM2 from `model_dir` + the tower and projector in `vision_dir`."""
    model_dir, vision_dir, out = Path(model_dir), Path(vision_dir), Path(out)
    check_new_folder(out, [model_dir, vision_dir])  # never into (or around) the decoder or the tower
    check_vision_folder(vision_dir)
    stored = read_json(vision_dir / CONFIG_FILE, ValueError)
    vision_manifest = read_json(vision_dir / "manifest.json", ValueError)
    layout = {"cell": CELL, "grid": GRID, "image_vocab_ids": IMAGE_VOCAB_IDS}
    if stored.get("vision_config") != dataclasses.asdict(vision_config()) or any(
            stored.get(key) != value for key, value in layout.items()):
        raise ValueError(f"{vision_dir / CONFIG_FILE}: written for another tower or image layout than this code's "
                         f"(vision_config {vision_config()}, {layout}); rebuild it with this version")
    config = llava_config(model_dir)
    tower = load_vision(vision_dir)
    width = tower["multi_modal_projector.linear_2.weight"].shape[0]
    if width != config.text.hidden_size:
        raise ValueError(f"{vision_dir / VISION_FILE}: its projector writes vectors of width {width}, but the decoder "
                         f"in {model_dir} reads width {config.text.hidden_size}: it was built for another model")
    with torch.device("meta"):
        model = Llava(config)
    model.load_state_dict({**load_state_dict(model_dir), **tower}, strict=True, assign=True)
    manifest = {"what": "SmolLM2-135M-Instruct (decoder) + the typographic tower and projector of worlds/smollm2/vision",
                "decoder_from": str(model_dir), "vision_from": str(vision_dir), "vision_manifest": vision_manifest}
    with new_folder(out, [model_dir, vision_dir]) as partial:
        save_model(model, partial, dtype=torch.float32)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(model_dir / name, partial / name)
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        open_checkpoint(partial)  # the loader's checks, on the headers
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worlds.smollm2.vision", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train the tower and projector (the decoder frozen)")
    build.add_argument("--model", required=True, help="the folder python -m weights_tools.smollm2 wrote")
    build.add_argument("--data", required=True, help="the folder python -m worlds.smollm2.data wrote")
    build.add_argument("--out", required=True, help="a new folder for the tower and projector")
    build.add_argument("--steps", type=positive_int, default=4000, help="optimizer steps (default 4000)")
    build.add_argument("--batch-size", type=positive_int, default=32, help="images per step (default 32)")
    build.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (AdamW; default 2e-3)")
    build.add_argument("--warmup", type=non_negative_int, default=100, help="warm-up steps (default 100)")
    build.add_argument("--read-weight", type=non_negative_float, default=1.0,
                       help="weight of the reading cross entropy beside the squared error (default 1; 0 = off)")
    build.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="seed of the initialisation and the images")
    build.add_argument("--threads", type=int_in(1, MAX_THREADS), default=1, help="torch CPU threads (default 1)")
    build.add_argument("--log-every", type=positive_int, default=50)
    add_debug_option(build)
    joined = commands.add_parser("join", help="write a LLaVA folder: the decoder + a built tower and projector")
    joined.add_argument("--model", required=True, help="the folder python -m weights_tools.smollm2 wrote")
    joined.add_argument("--vision", default=str(VISION_ASSET),
                        help="the folder `build` wrote (default: the committed assets/smollm2_vision)")
    joined.add_argument("--out", required=True, help="a new folder for the LLaVA checkpoint")
    add_debug_option(joined)
    return parser.parse_args(argv)


def build(args: argparse.Namespace, argv: list[str]) -> dict:
    torch.set_num_threads(args.threads)
    start = time.time()
    model_dir, data_dir, out = Path(args.model), Path(args.data), Path(args.out)
    check_new_folder(out, [model_dir, data_dir])  # before the (long) training: never into or around an input
    embeddings = load_state_dict(model_dir)["language_model.embed_tokens.weight"].float()  # (V, D), fixed
    painter = painter_for(model_dir)
    texts, heldout = training_texts(data_dir), heldout_texts(data_dir)
    model = vision_side(llava_config(model_dir), args.seed)
    print(f"tower + projector: {sum(p.numel() for p in _VisionOnly(model).parameters()) / 1e6:.2f}M parameters, "
          f"{len(painter.ids)} drawable pieces, {len(texts)} training texts", file=sys.stderr)
    before = reading_accuracy(model, embeddings, painter, heldout)
    train(model, embeddings, painter, texts, args)
    after = reading_accuracy(model, embeddings, painter, heldout)
    print(f"held-out AdvBench val as images: {after}", file=sys.stderr)
    manifest = {"what": "CLIP tower + projector reading SmolLM2 pieces drawn one per cell (worlds/smollm2/vision.py)",
                "build_command": "python -m worlds.smollm2.vision " + " ".join(argv),
                "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                "drawable_pieces": len(painter.ids), "training_texts": len(texts),
                "heldout_before_training": before, "heldout_after_training": after,
                "torch_version": torch.__version__, "python_version": platform.python_version(),
                "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                "build_seconds": round(time.time() - start, 1)}
    with new_folder(out, [model_dir, data_dir]) as folder:
        save_vision(model, folder, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with exit_on_user_error("worlds.smollm2.vision", args.debug):
        if args.command == "build":
            build(args, argv)
        else:
            print(f"wrote {join(args.model, args.vision, args.out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
