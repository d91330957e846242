"""Write a tiny random LLaVA checkpoint: config.json + model.safetensors (llava-hf layout) + tokenizer.json; or, with
--text-only, a tiny LlamaForCausalLM (transformers' layout), the architecture of the LLM judges.

For tests and smoke runs: it loads with `ref.weights.load_model` (and with transformers' LlavaForConditionalGeneration,
in the llava-hf layout) and runs in milliseconds. Deterministic from the seed (no global RNG is touched).

The tokenizer mimics LLaMA's conventions with the `tokenizers` library: "<unk>"=0, "<s>"=1, "</s>"=2, "<s>" added at
the start of every encoding, then the 256 byte-level symbols (any text encodes, nothing is unknown) and a few merges for
common words of the prompts; "<image>" and "<pad>" are added last as special tokens and their ids become the config's
`image_token_index` and `pad_token_id`. The config's vocab_size is the tokenizer size rounded up to a multiple of 64
(as llava-hf pads its 32002 tokens to 32064).

    python -m weights_tools.make_tiny OUT_DIR [--seed 0] [--text-only] [--text-hidden-size 64 ...]

OUT_DIR must be new or empty: a folder that holds files (another model, say) is refused before anything is written,
and the files are written in a temporary folder renamed to OUT_DIR when complete (`harness.files.new_folder`). Every
size has a range (SIZE_LIMITS), so that a typo cannot ask for a model that does not fit in memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from ref.config import LlavaConfig, TextConfig, VisionConfig, parse_llama, parse_llava_hf
from harness.console import add_debug_option, exit_on_user_error, int_in
from harness.files import check_new_folder, new_folder
from ref.llava import Llava
from ref.weights import save_model

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in LLaMA
ADDED_TOKENS = ["<image>", "<pad>"]  # appended after the vocabulary, as llava-hf does
# Words that get merged into single tokens ("Ġ" is the byte-level symbol for a leading space).
WORDS = ["USER", "What", "ĠASSISTANT", "ĠUSER", "ĠWhat", "Ġwhat", "Ġthe", "Ġimage", "Ġthis", "Ġis", "Ġa", "Ġof",
         "Ġand", "Ġto", "Ġin", "Ġhow", "ĠHow", "Ġmake", "ĠI", "Ġcan", "Ġnot", "Ġhelp", "Ġwith", "Ġthat", "ĠSorry",
         "Ġsorry", "Ġyou", "Ġdo", "Ġit", "Ġpicture", "Ġshow", "Ġdescribe", "ĠDescribe"]

DEFAULT_SIZES = dict(
    vision_hidden_size=32, vision_intermediate_size=64, vision_layers=2, vision_heads=2, image_size=28, patch_size=14,
    text_hidden_size=64, text_intermediate_size=128, text_layers=2, text_heads=4, text_kv_heads=4,
    max_position_embeddings=1024,
)
# The largest value of each size on the command line: far past a tiny model, yet every combination of them fits in a
# few GB (a 16-layer decoder of width 2048 is 0.9 B parameters). The library function takes any size.
SIZE_LIMITS = dict(
    vision_hidden_size=2048, vision_intermediate_size=8192, vision_layers=16, vision_heads=64, image_size=1024,
    patch_size=1024, text_hidden_size=2048, text_intermediate_size=8192, text_layers=16, text_heads=64,
    text_kv_heads=64, max_position_embeddings=131072,
)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer


def build_tokenizer(extra_words: tuple[str, ...] = ()) -> Tokenizer:
    """A byte-level BPE tokenizer with LLaMA's special-token conventions (fully determined by the lists above);
    `extra_words` become single tokens too."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    merges = []
    # merge each word left to right: (w[:1], w[1]) -> w[:2], (w[:2], w[2]) -> w[:3], ...
    for word in WORDS + list(extra_words):
        for i in range(1, len(word)):
            if word[: i + 1] not in vocab:
                merges.append((word[:i], word[i]))
                vocab[word[: i + 1]] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + ADDED_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", vocab["<s>"])])
    return tokenizer


def tiny_config(tokenizer: Tokenizer, text_only: bool = False, **sizes) -> LlavaConfig:
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown size(s) {sorted(unknown)}; known: {sorted(DEFAULT_SIZES)}")
    s = {**DEFAULT_SIZES, **sizes}
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab_size = -(-n_tokens // 64) * 64  # round up to a multiple of 64, as llava-hf does
    vision = VisionConfig(hidden_size=s["vision_hidden_size"], intermediate_size=s["vision_intermediate_size"],
                          num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                          image_size=s["image_size"], patch_size=s["patch_size"])
    text = TextConfig(vocab_size=vocab_size, hidden_size=s["text_hidden_size"],
                      intermediate_size=s["text_intermediate_size"], num_hidden_layers=s["text_layers"],
                      num_attention_heads=s["text_heads"], num_key_value_heads=s["text_kv_heads"],
                      head_dim=s["text_hidden_size"] // s["text_heads"],
                      max_position_embeddings=s["max_position_embeddings"],
                      bos_token_id=tokenizer.token_to_id("<s>"), eos_token_id=tokenizer.token_to_id("</s>"))
    if text_only:  # a LlamaForCausalLM: the architecture of the LLM judges
        return LlavaConfig(vision=None, text=text, image_token_index=None, pad_token_id=tokenizer.token_to_id("<pad>"),
                           source_format="llama")
    return LlavaConfig(vision=vision, text=text, image_token_index=tokenizer.token_to_id("<image>"),
                       pad_token_id=tokenizer.token_to_id("<pad>"))


def check_loadable(config: LlavaConfig) -> None:
    """The config.json these sizes give passes the loader's checks (heads that divide the width, patches that fit the
    image, ...): a checkpoint the loader would refuse is never written. Errors name the config key."""
    raw = config.to_dict()
    where = "the sizes given (as config.json)"
    parse_llama(raw, where) if config.vision is None else parse_llava_hf(raw, where)


@torch.no_grad()
def random_model(config: LlavaConfig, seed: int = 0) -> Llava:
    """A Llava with every parameter drawn from a generator seeded with `seed` (in named-parameter order)."""
    model = Llava(config).eval()
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "norm" in name and name.endswith("weight"):  # norm gains near 1 keep activations in range
            param.copy_(1.0 + 0.1 * noise)
        elif param.dim() == 1:  # biases, the CLS embedding
            param.copy_(0.1 * noise)
        else:  # fan-in scaling: x @ W.T keeps roughly unit variance
            param.copy_(noise * param[0].numel() ** -0.5)
    model.requires_grad_(False)
    return model


def write_tiny_checkpoint(folder: str | Path, seed: int = 0, text_only: bool = False, extra_words: tuple[str, ...] = (),
                          model_edit=None, **sizes) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json to `folder`; return it.

    `sizes` override DEFAULT_SIZES (e.g. text_layers=1, image_size=56). text_only: a LlamaForCausalLM checkpoint (no
    vision tower, no projector) in transformers' layout. `model_edit(model, tokenizer)`, if given, changes the random
    weights before they are written (tests use it to make a model that answers as they need).
    """
    folder = Path(folder)
    check_new_folder(folder)  # before the work: a folder of files (another model) is never written over
    tokenizer = build_tokenizer(extra_words)
    config = tiny_config(tokenizer, text_only, **sizes)
    check_loadable(config)
    model = random_model(config, seed)
    if model_edit is not None:
        model_edit(model, tokenizer)
    with new_folder(folder) as partial:  # renamed to `folder` once complete
        save_model(model, partial)
        tokenizer.save(str(partial / "tokenizer.json"))
        # For transformers' PreTrainedTokenizerFast (tests only); our code reads tokenizer.json alone.
        (partial / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": config.text.max_position_embeddings},
            indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.make_tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write: new or empty (created if needed)")
    parser.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="weights seed (default 0)")
    parser.add_argument("--text-only", action="store_true",
                        help="a text-only LlamaForCausalLM checkpoint (the architecture of the LLM judges)")
    for key, default in DEFAULT_SIZES.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int_in(1, SIZE_LIMITS[key]), default=default, dest=key,
                            help=f"1 to {SIZE_LIMITS[key]} (default {default})")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    sizes = {key: getattr(args, key) for key in DEFAULT_SIZES}
    with exit_on_user_error("make_tiny", args.debug):
        folder = write_tiny_checkpoint(args.out_dir, seed=args.seed, text_only=args.text_only, **sizes)
    print(f"wrote {folder}: config.json, model.safetensors, tokenizer.json, tokenizer_config.json")


if __name__ == "__main__":
    main()
