"""Text and images for LLaVA-1.5: tokenization, prompt formats, label masks, batching, CLIP image preprocessing.

What lives here, in the order a sample travels:

1. `TextTokenizer` / `load_tokenizer`: a thin wrapper over `tokenizers.Tokenizer` reading a model folder's
   `tokenizer.json`; it knows the BOS, EOS, pad and `<image>` ids. `check_token_ids` refuses one whose ids run past
   the model's embedding rows.
2. `PROMPT_FORMATS` / `build_prompt`: the llava-hf format `"USER: <image>\\n{prompt} ASSISTANT:"`, the original
   `vicuna_v1` conversation LLaVA-1.5 was trained with (system line first, assistant turns closed by `</s>`), and
   `chatml`, SmolLM2-Instruct's (`<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`).
3. `expand_image_tokens`: each `<image>` id becomes `image_seq_length` copies (llava-hf convention: the model
   replaces them, in order, by the projected patch features of the images).
4. `build_training_example`, `collate_for_training`, `collate_for_generation`: input ids with labels that are
   `IGNORE_INDEX` (-100) everywhere except the response tokens and the closing EOS; right padding for training,
   left padding for generation.
5. `load_image`, `preprocess_image`: CLIP's preprocessing (resize shortest side, centre crop, rescale, normalise),
   optionally after LLaVA-1.5's pad-to-square, with Pillow and numpy. Every image file is opened by `load_image`,
   which refuses an image bomb by its header (`check_image_size`); `to_rgb` scales 16-bit and float images by their
   value range.
6. `Processor` / `load_processor`: prompts + images -> `input_ids`, `attention_mask`, `pixel_values`, as
   transformers' `LlavaProcessor` produces them (the tests compare the two).

Labels follow the Hugging Face convention: `labels[t]` is aligned with `input_ids[t]` (not shifted); the loss
predicts `labels[t + 1]` from position t.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tokenizers
import torch
from PIL import Image

from ref.config import load_config

IGNORE_INDEX = -100  # label of every position the loss must skip (prompt, image tokens, padding)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_TO_SQUARE_FILL = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104): LLaVA-1.5's expand2square colour

IMAGE_TOKEN = "<image>"



class DataError(ValueError):
    """Bad input to the data pipeline: the message names the file or the offending value."""


class TokenizerError(DataError):
    """A tokenizer.json that is missing, unreadable, or lacks a token we need."""


class ImageError(DataError):
    """An image file that cannot be opened or decoded."""


class PromptTooLongError(DataError):
    """A prompt that does not fit the model's context."""


# ---------------------------------------------------------------------------------------------------------------------
# 1. Tokenizer


class TextTokenizer:
    """`tokenizers.Tokenizer` plus the ids LLaVA needs. We never let the tokenizer's post-processor add special
    tokens: BOS is added explicitly (`add_bos=True`), so the same code works whatever tokenizer.json says.

    `bos_token` / `eos_token` name the model's BOS and EOS (LLaMA's `<s>` and `</s>`; SmolLM2's `<|im_start|>` and
    `<|im_end|>`), and `adds_bos` says whether a prompt starts with BOS (LLaMA: yes; a ChatML model: no, its prompt
    starts with `<|im_start|>system`): tokenizer_config.json's `bos_token`, `eos_token` and `add_bos_token`."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, image_token_id: int | None = None,
                 pad_token_id: int | None = None, source: str = "tokenizer", images: bool = True,
                 bos_token: str = "<s>", eos_token: str = "</s>", adds_bos: bool = True):
        self.backend = tokenizer
        self.source = source
        self.bos_id = self._required_id(bos_token)
        self.eos_id = self._required_id(eos_token)
        self.adds_bos = adds_bos
        # A text-only model's tokenizer (images=False) keeps its vocabulary as it is: no `<image>` token.
        self.image_token_id = self._image_token_id(image_token_id) if images else None
        self.pad_id = self._pad_id(pad_token_id)

    def _required_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: the vocabulary has no {token!r} token (LLaMA's BOS and EOS are <s> and "
                                 "</s>; another model names its own in tokenizer_config.json's bos_token, eos_token)")
        return token_id

    def _image_token_id(self, expected: int | None) -> int:
        token_id = self.backend.token_to_id(IMAGE_TOKEN)
        if token_id is None:
            # The original LLaVA release ships LLaMA's 32000-piece vocabulary; llava-hf adds `<image>` right after it.
            # Add it the same way, as a special token, so that "<image>" in a prompt is one token.
            self.backend.add_special_tokens([tokenizers.AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
            token_id = self.backend.token_to_id(IMAGE_TOKEN)
        if expected is not None and token_id != expected:
            raise TokenizerError(f"{self.source}: {IMAGE_TOKEN!r} has id {token_id} but the model config says "
                                 f"image_token_index = {expected}")
        return token_id

    def _pad_id(self, expected: int | None) -> int:
        token_id = self.backend.token_to_id("<pad>")
        if token_id is not None:
            if expected is not None and token_id != expected:
                raise TokenizerError(f"{self.source}: '<pad>' has id {token_id} but the model config says "
                                     f"pad_token_id = {expected}")
            return token_id
        if expected is not None:
            return expected
        return self._required_id("<unk>")  # what the original LLaVA training code pads with

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (base pieces + added tokens); the model's table may be larger."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """The text's ids; with add_bos, BOS first where the model's prompts start with it (`adds_bos`)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.adds_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(model_dir: str | Path, image_token_id: int | None = None,
                   pad_token_id: int | None = None, images: bool = True) -> TextTokenizer:
    """Read `model_dir/tokenizer.json`. `image_token_id`/`pad_token_id` (from the model config) are checked against
    the vocabulary's `<image>`/`<pad>`, or used where the vocabulary has none; images=False for a text-only model."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{path}: no such file (a model folder needs the fast tokenizer's tokenizer.json; "
                             "a SentencePiece tokenizer.model must be converted first)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({err})") from err
    return TextTokenizer(backend, image_token_id=image_token_id, pad_token_id=pad_token_id, source=str(path),
                         images=images, **special_tokens(Path(model_dir) / "tokenizer_config.json"))


def special_tokens(path: Path) -> dict:
    """BOS, EOS and whether prompts start with BOS, from transformers' tokenizer_config.json when the folder has one
    (a token is a string or an {"content": ...} object there); LLaMA's `<s>`, `</s>` and yes otherwise."""
    found = {"bos_token": "<s>", "eos_token": "</s>", "adds_bos": True}
    if not path.is_file():
        return found
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(config).__name__}")
    for key in ("bos_token", "eos_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and not isinstance(token, str):
            raise TokenizerError(f"{path}: {key} must be a string, got {token!r}")
        found[key] = token or found[key]
    adds_bos = config.get("add_bos_token", True)
    if not isinstance(adds_bos, bool):
        raise TokenizerError(f"{path}: add_bos_token must be true or false, got {adds_bos!r}")
    found["adds_bos"] = adds_bos
    return found


def check_token_ids(tokenizer: TextTokenizer, vocab_rows: int, where: str) -> None:
    """Refuse a tokenizer that can emit an id the model has no embedding row for (a tokenizer from another model, or
    tokens added after the checkpoint was saved): the embedding lookup or the loss would fail mid-run, or on a GPU
    with a device-side assert that names nothing. `vocab_rows` is the model's embedding rows, `where` names them
    (the checkpoint). The `<image>` id is exempt: the model replaces image tokens by image features before the lookup
    (the original release has 32000 rows and `<image>` = 32000)."""
    ids = {token: i for token, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()
           if i != tokenizer.image_token_id}
    token, largest = max(ids.items(), key=lambda item: item[1])
    if largest >= vocab_rows:
        raise TokenizerError(f"{tokenizer.source}: the largest token id is {largest} ({token!r}) but {where} has "
                             f"{vocab_rows} embedding rows (ids 0 to {vocab_rows - 1}); use the tokenizer.json that "
                             "came with the checkpoint")


# ---------------------------------------------------------------------------------------------------------------------
# 2. Prompt formats


@dataclass(frozen=True)
class PromptFormat:
    """How one conversation turn is written. A full prompt is
    `system + user_prefix + image_marker * n_images + question + assistant_prefix`; a finished assistant reply is
    `reply_prefix + reply + turn_end`, and the next user turn follows directly."""

    name: str
    system: str
    user_prefix: str = "USER: "
    assistant_prefix: str = " ASSISTANT:"
    reply_prefix: str = " "
    turn_end: str = "</s>"
    image_marker: str = IMAGE_TOKEN + "\n"


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# SmolLM2-Instruct's chat template puts this system turn first when the conversation has none.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

PROMPT_FORMATS = {
    # llava-hf's model card and chat template: no system prompt.
    "llava-hf": PromptFormat(name="llava-hf", system=""),
    # LLaVA's conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>"): what LLaVA-1.5 was trained with.
    "vicuna_v1": PromptFormat(name="vicuna_v1", system=VICUNA_SYSTEM + " "),
    # ChatML as SmolLM2-Instruct's chat template writes it (with add_generation_prompt): each turn is
    # "<|im_start|>{role}\n{content}<|im_end|>\n"; no BOS (tokenizer_config.json: add_bos_token false).
    "chatml": PromptFormat(name="chatml", system=f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n",
                           user_prefix="<|im_start|>user\n", assistant_prefix="<|im_end|>\n<|im_start|>assistant\n",
                           reply_prefix="", turn_end="<|im_end|>\n"),
}


def get_prompt_format(name: str | PromptFormat) -> PromptFormat:
    if isinstance(name, PromptFormat):
        return name
    if name not in PROMPT_FORMATS:
        raise DataError(f"unknown prompt format {name!r}; known formats: {sorted(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[name]


def build_prompt(question: str, num_images: int = 0, prompt_format: str | PromptFormat = "llava-hf",
                 history: Sequence[tuple[str, str]] = ()) -> str:
    """The text the model sees before it answers `question`. Images go first in the first user turn (one
    `<image>\\n` each); `history` holds earlier (question, answer) turns."""
    fmt = get_prompt_format(prompt_format)
    text = fmt.system
    images = fmt.image_marker * num_images
    for past_question, past_answer in history:
        text += (fmt.user_prefix + images + past_question + fmt.assistant_prefix + fmt.reply_prefix + past_answer
                 + fmt.turn_end)
        images = ""
    return text + fmt.user_prefix + images + question + fmt.assistant_prefix


# ---------------------------------------------------------------------------------------------------------------------
# 3. Image tokens


def expand_image_tokens(ids: Sequence[int], image_token_id: int, image_seq_length: int) -> list[int]:
    """Each image token becomes `image_seq_length` image tokens. Same ids as transformers' LlavaProcessor, which
    repeats the `<image>` text before tokenizing (an added special token is never merged with its neighbours)."""
    expanded = []
    for token in ids:
        expanded.extend([token] * image_seq_length if token == image_token_id else [token])
    return expanded


# More characters than any token of the vocabularies LLaVA models use holds (LLaMA-2's longest is 16): a text longer
# than this many characters per position of the context cannot fit it, and is refused (or cut) without tokenizing it,
# so a 50 MB prompt costs a length check, not gigabytes of token ids.
MAX_CHARS_PER_TOKEN = 64


def tokenize_prompt(tokenizer: TextTokenizer, prompt: str, image_seq_length: int | None = None,
                    max_length: int | None = None) -> list[int]:
    """BOS + the prompt's ids with every `<image>` expanded: exactly what generation feeds the model."""
    if max_length is not None and len(prompt) > MAX_CHARS_PER_TOKEN * max_length:
        raise PromptTooLongError(f"the prompt is {len(prompt):,} characters, more than {MAX_CHARS_PER_TOKEN} per "
                                 f"position of the context of {max_length} tokens: {prompt[:80]!r}...")
    ids = tokenizer.encode(prompt, add_bos=True)
    if tokenizer.image_token_id in ids:
        if image_seq_length is None:
            raise DataError(f"the prompt holds {IMAGE_TOKEN} but no image_seq_length was given: {prompt[:80]!r}")
        ids = expand_image_tokens(ids, tokenizer.image_token_id, image_seq_length)
    if max_length is not None and len(ids) > max_length:
        raise PromptTooLongError(f"the prompt is {len(ids)} tokens (images expanded) but the context holds "
                                 f"{max_length}: {prompt[:80]!r}...")
    return ids


# ---------------------------------------------------------------------------------------------------------------------
# 4. Training examples, label masks and batches


@dataclass
class TrainingExample:
    """One sequence for teacher forcing. `labels[t]` is `input_ids[t]` on response tokens and the closing EOS,
    `IGNORE_INDEX` elsewhere (BOS, system line, question, image tokens). `pixel_values` holds this example's images
    (n_images, 3, S, S), in the order of their `<image>` markers, or None."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None = None

    @property
    def num_response_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def build_training_example(tokenizer: TextTokenizer, prompt: str, response: str,
                           image_seq_length: int | None = None, max_length: int | None = None,
                           pixel_values: torch.Tensor | None = None) -> TrainingExample:
    """`prompt` as `build_prompt` writes it (ending in "ASSISTANT:"), `response` the answer's text.

    Tokenization at the boundary: the prompt and the response are tokenized SEPARATELY and concatenated,
        input_ids = tokenize_prompt(prompt) + encode(response) + [EOS].
    So the prompt part is exactly the ids generation sees (tokenizing prompt + response together could let a
    SentencePiece merge cross the boundary and change the prompt's last token). The response is encoded on its own:
    SentencePiece's dummy prefix turns its first word into "▁word", which stands for the space after "ASSISTANT:",
    the same tokens as tokenizing `prompt + " " + response` in one go whenever no merge crosses the boundary (the
    tests check this with the real LLaMA-2 vocabulary). Leading whitespace of `response` is dropped for that reason.

    If the sequence is longer than `max_length`, the response is cut at the right (and then has no EOS); a prompt
    that leaves no room for a single response token is an error.
    """
    prompt_ids = tokenize_prompt(tokenizer, prompt, image_seq_length, max_length)
    response = response.lstrip()
    if max_length is not None:  # what could not fit is not tokenized (the ids kept are the same: merges are local)
        response = response[: MAX_CHARS_PER_TOKEN * max_length]
    response_ids = tokenizer.encode(response) + [tokenizer.eos_id]
    if max_length is not None:
        if len(prompt_ids) >= max_length:
            raise PromptTooLongError(f"the prompt is {len(prompt_ids)} tokens (images expanded), leaving no room for "
                                     f"the response in a context of {max_length}: {prompt[:80]!r}...")
        response_ids = response_ids[: max_length - len(prompt_ids)]
    n_images = prompt_ids.count(tokenizer.image_token_id) // image_seq_length if image_seq_length else 0
    if pixel_values is not None and pixel_values.shape[0] != n_images:
        raise DataError(f"the prompt has {n_images} image(s) but pixel_values holds {pixel_values.shape[0]}")
    return TrainingExample(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        pixel_values=pixel_values,
    )


def _pad(rows: Sequence[Sequence[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(row) for row in rows)
    padded = [list(row) + [value] * (width - len(row)) if side == "right" else
              [value] * (width - len(row)) + list(row) for row in rows]
    return torch.tensor(padded, dtype=torch.long)  # (B, T)


def _mask(rows: Sequence[Sequence[int]], side: str) -> torch.Tensor:
    return _pad([[1] * len(row) for row in rows], 0, side)  # (B, T)


def collate_for_training(examples: Sequence[TrainingExample], pad_id: int,
                         image_token_id: int | None = None) -> dict[str, torch.Tensor | int]:
    """Right padding: real tokens keep positions 0..n-1 (position ids need no correction), padding gets
    attention_mask 0 and label IGNORE_INDEX. `pixel_values` (all images, in example order) only when there are any.
    With `image_token_id`, "image_tokens" counts them, here on the host, where it costs nothing: the model then need
    not count them on its device (ref.llava.Llava.embed)."""
    if not examples:
        raise DataError("collate_for_training: empty batch")
    batch = {
        "input_ids": _pad([e.input_ids for e in examples], pad_id, "right"),  # (B, T)
        "labels": _pad([e.labels for e in examples], IGNORE_INDEX, "right"),  # (B, T)
        "attention_mask": _mask([e.input_ids for e in examples], "right"),  # (B, T)
    }
    if image_token_id is not None:
        batch["image_tokens"] = sum(e.input_ids.count(image_token_id) for e in examples)
    images = [e.pixel_values for e in examples if e.pixel_values is not None and len(e.pixel_values)]
    if images:
        batch["pixel_values"] = torch.cat(images)  # (N_images, 3, S, S)
    return batch


def collate_for_generation(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padding, so every row's last position is its last prompt token and new tokens append on the right."""
    if not prompts:
        raise DataError("collate_for_generation: empty batch")
    return {"input_ids": _pad(prompts, pad_id, "left"), "attention_mask": _mask(prompts, "left")}  # (B, T) each


# ---------------------------------------------------------------------------------------------------------------------
# 5. Images


# Refused before decoding (Image.open reads only the header): a tiny file can declare a huge image. The pixel bound
# keeps one decoded image under ~256 MB (RGBA); the aspect bound stops the shortest-side resize from turning a
# 1 x 5000 strip (a 90-byte PNG) into 336 x 1,680,000. Published benchmark images are near square, the typographic
# images evals/typographic.py draws are square, so neither bound refuses them.
MAX_IMAGE_PIXELS = 8192 * 8192  # 64 megapixels
MAX_ASPECT_RATIO = 20  # long side / short side

UINT16_MAX = 65535
INT32_MAX = 2**31 - 1


def check_image_size(size: tuple[int, int], where: str | Path) -> None:
    """Refuse an image (width, height) that is empty, over MAX_IMAGE_PIXELS or longer than MAX_ASPECT_RATIO:1."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{where}: an empty image ({width} x {height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{where}: {width} x {height} pixels is more than the {MAX_IMAGE_PIXELS} (8192 x 8192) "
                         "this pipeline decodes; downscale the image")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(f"{where}: {width} x {height} pixels has an aspect ratio of {ratio:.0f}:1, beyond the "
                         f"{MAX_ASPECT_RATIO}:1 this pipeline accepts; crop or pad the image")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file, check its declared size (`check_image_size`) and decode it now, so that a broken or
    oversized file fails here, naming the file. Every reader of a user's image goes through this function."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound is lower
            opened = Image.open(path)
        with opened as image:
            check_image_size(image.size, path)
            image.load()
            return image.copy()
    except Image.DecompressionBombError as err:  # so large that Pillow refuses it in Image.open already
        raise ImageError(f"{path}: more than the {MAX_IMAGE_PIXELS} pixels this pipeline decodes ({err}); "
                         "downscale the image") from err
    except ImageError:
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... for broken files
        raise ImageError(f"{path}: cannot be read as an image ({err})") from err


def _grey_to_8bit(image: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image as (H, W) uint8, scaled by its value range (`convert("L")` or
    `convert("RGB")` clip these at 255, so a 16-bit mid-grey comes out white):
        I;16*  16-bit unsigned: v * 255 / 65535, rounded (65535 -> 255, 32768 -> 128);
        I      32-bit ints: as 8-bit values while all are <= 255, else as 16-bit (what old Pillow and TIFF readers
               put in "I") while all are <= 65535, else by the int32 range; negatives are 0. (A 16-bit image whose
               values all happen to be <= 255 is read as 8-bit: the mode alone cannot tell them apart.)
        F      floats: v * 255 if all are <= 1 (the [0, 1] convention), else v; then clipped to [0, 255].
    A grey image's transparent value (its "transparency") becomes white, as `to_rgb` composites colour images."""
    values = np.asarray(image).astype(np.float64)  # (H, W)
    peak = np.nanmax(values, initial=0.0)
    if image.mode.startswith("I;16"):
        scale = 255 / UINT16_MAX
    elif image.mode == "I":
        scale = 1.0 if peak <= 255 else 255 / UINT16_MAX if peak <= UINT16_MAX else 255 / INT32_MAX
    else:
        scale = 255.0 if peak <= 1 else 1.0
    grey = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)):
        grey[np.asarray(image) == transparent] = 255
    return grey


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' CLIP processor does; a plain
    `convert("RGB")` would expose whatever colour hides under transparent pixels), and 16-bit, 32-bit and float grey
    images scaled by their value range (`_grey_to_8bit`)."""
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_grey_to_8bit(image)).convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def pad_to_square(pixels: np.ndarray, fill: Sequence[int] = PAD_TO_SQUARE_FILL) -> np.ndarray:
    """LLaVA-1.5's expand2square: centre the (H, W, 3) image on a square of side max(H, W) filled with `fill`."""
    height, width, channels = pixels.shape
    side = max(height, width)
    square = np.empty((side, side, channels), dtype=pixels.dtype)
    square[:] = np.asarray(fill, dtype=pixels.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    square[top: top + height, left: left + width] = pixels
    return square  # (side, side, 3)


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the short side is `size`; the long side becomes int(size * long / short) (truncated)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)  # (W, H)
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """Crop (H, W, C) to (size, size) at offset ((H - size) // 2, (W - size) // 2)."""
    height, width = pixels.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return pixels[top: top + size, left: left + size]


def preprocess_image(image: Image.Image | str | Path, image_size: int = 336,
                     pad_square: bool = False) -> torch.Tensor:
    """CLIP preprocessing -> float32 (3, S, S):
        [pad to square] -> resize shortest side to S -> centre crop S -> x / 255 -> (x - mean) / std."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    else:  # decoded already, but the resize below is what an extreme aspect ratio blows up
        check_image_size(image.size, getattr(image, "filename", "") or "an in-memory image")
    image = to_rgb(image)
    if pad_square:
        image = Image.fromarray(pad_to_square(np.asarray(image)))
    pixels = np.asarray(resize_shortest_side(image, image_size))  # (H', W', 3) uint8
    pixels = center_crop(pixels, image_size).astype(np.float64) / 255.0  # (S, S, 3)
    pixels = (pixels - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    return torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32))  # (3, S, S)


def preprocess_images(images: Sequence[Image.Image | str | Path], image_size: int = 336,
                      pad_square: bool = False) -> torch.Tensor:
    return torch.stack([preprocess_image(im, image_size, pad_square) for im in images])  # (N, 3, S, S)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Processor


class Processor:
    """Prompts (with `<image>` markers) + images -> model inputs, as transformers' LlavaProcessor builds them:
    BOS, each `<image>` expanded to `image_seq_length` image tokens, a batch left-padded (it is for generation).
    Images are consumed in order across the batch."""

    def __init__(self, tokenizer: TextTokenizer, image_size: int | None, image_seq_length: int | None,
                 max_length: int, pad_square: bool = False):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.image_seq_length = image_seq_length
        self.max_length = max_length
        self.pad_square = pad_square

    def tokenize_prompt(self, prompt: str) -> list[int]:
        return tokenize_prompt(self.tokenizer, prompt, self.image_seq_length, self.max_length)

    def images_to_tensor(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        if self.image_size is None:
            raise DataError(f"{self.tokenizer.source}: a text-only model's processor takes no images")
        return preprocess_images(images, self.image_size, self.pad_square)  # (N, 3, S, S)

    def __call__(self, text: str | Sequence[str], images: Sequence[Image.Image | str | Path] | None = None
                 ) -> dict[str, torch.Tensor]:
        prompts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else ([images] if isinstance(images, (Image.Image, str, Path)) else list(images))
        n_markers = sum(prompt.count(IMAGE_TOKEN) for prompt in prompts)
        if n_markers != len(images):
            raise DataError(f"the prompts hold {n_markers} {IMAGE_TOKEN} marker(s) but {len(images)} image(s) "
                            "were given")
        batch = collate_for_generation([self.tokenize_prompt(p) for p in prompts], self.tokenizer.pad_id)
        if images:
            batch["pixel_values"] = self.images_to_tensor(images)  # (N, 3, S, S)
        return batch

    def training_example(self, prompt: str, response: str,
                         images: Sequence[Image.Image | str | Path] | None = None) -> TrainingExample:
        pixel_values = self.images_to_tensor(images) if images else None
        return build_training_example(self.tokenizer, prompt, response, self.image_seq_length, self.max_length,
                                      pixel_values)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)


def load_processor(model_dir: str | Path, vision_dir: str | Path | None = None,
                   pad_square: bool | None = None) -> Processor:
    """Processor for a model folder: image size, image_seq_length, context length and token ids from its
    config.json, the vocabulary from its tokenizer.json. `pad_square` defaults to what the checkpoint was trained
    with: True for the original release (`image_aspect_ratio: pad`), False for llava-hf (its processor does not pad)."""
    config = load_config(model_dir, vision_dir)
    tokenizer = load_tokenizer(model_dir, image_token_id=config.image_token_index, pad_token_id=config.pad_token_id,
                               images=not config.text_only)
    if pad_square is None:
        pad_square = config.source_format == "original"
    check_token_ids(tokenizer, config.text.vocab_size, f"{model_dir}/config.json")
    image_size = None if config.text_only else config.vision.image_size
    return Processor(tokenizer, image_size=image_size, image_seq_length=config.image_seq_length or None,
                     max_length=config.text.max_position_embeddings, pad_square=pad_square)
