"""The toy tokenizer: LLaMA's conventions (`<unk>` 0, `<s>` 1, `</s>` 2, metaspace pieces, `<s>` prepended), learned
by byte-pair encoding on every sentence of the toy world, with `<image>` and `<pad>` appended as llava-hf appends them
(its ids 32000 and 32001). Every toy word is one token (tests/test_toy.py checks it), which the build's
image-text alignment loss relies on.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from worlds.toy.world import corpus_texts

CHAT_WORDS = ["USER:", "ASSISTANT:"]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in LLaMA
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"  # appended after the learned vocabulary, as llava-hf does


def build_tokenizer(vocab_size: int = 704):
    """A LLaMA-style BPE tokenizer (metaspace, `<s>` prepended) trained on the toy corpus with the `tokenizers`
    library. `<image>` and `<pad>` come right after the learned pieces, like llava-hf's ids 32000 and 32001."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # Split "\n" off as its own piece so the word after "<image>\n" is the same token as anywhere else.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                       pre_tokenizers.Metaspace(prepend_scheme="always")])
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1,
                                  show_progress=False)
    chat = [f"{CHAT_WORDS[0]} {text} {CHAT_WORDS[1]} {text}" for text in corpus_texts()] + ["\n"]
    tokenizer.train_from_iterator(list(corpus_texts()) + chat, trainer)
    tokenizer.add_special_tokens([IMAGE_TOKEN, PAD_TOKEN])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return tokenizer
