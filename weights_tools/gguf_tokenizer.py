r"""A `tokenizers` tokenizer (what tokenizer.json holds) rebuilt from a GGUF file's byte-level BPE metadata.

A GGUF carries no tokenizer.json: llama.cpp's converter stores the vocabulary (`tokenizer.ggml.tokens`, with
`tokenizer.ggml.token_type` per token), the merges, the special ids, and the name of the pre-tokenizer
(`tokenizer.ggml.pre`) it recognised in the original tokenizer.json. We rebuild that tokenizer.json the way
transformers' GGUF loader does (transformers/integrations/gguf/gguf_tokenizer_mapping.py: GPT2Tokenizer's byte-level
BPE, control tokens added as special tokens, user-defined ones as plain added tokens), with one deliberate difference:

  the pre-tokenizer is llama.cpp's for the named type (llama-vocab.cpp, `regex_exprs`), not transformers'. For
  "smollm" (and "starcoder") llama.cpp first isolates every digit (`\p{N}`), then applies GPT-2's regex: HF's
  `Digits(individual_digits=True)` then `ByteLevel`, the split llama.cpp recognised in SmolLM's tokenizer.json.
  transformers 5.x has no entry for "smollm" and falls back to GPT-2's regex alone. On SmolLM2's vocabulary (no token
  or merge holds a digit with anything else) the two differ only where a whitespace run precedes a digit: "a  1" is
  a, ĠĠ, 1 with llama.cpp's split (and here), a, Ġ, Ġ, 1 with transformers'.

Only byte-level BPE ("gpt2" in `tokenizer.ggml.model`) is built; SentencePiece ("llama") and others are refused.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from weights_tools.gguf import GGUFError, GGUFFile

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (tokenizer.ggml.token_type)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's own regex is GPT-2's: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies for it (llama-vocab.cpp, `regex_exprs`).
PRE_TOKENIZERS = {"gpt2": _gpt2, "smollm": _digits_then_gpt2, "starcoder": _digits_then_gpt2}
SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode): the spelling of every byte-level token."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def _vocabulary(gguf: GGUFFile, tokens: list[str]) -> dict[str, int]:
    """token -> id. A token written with characters outside the byte alphabet (a literal space, say) is respelled
    byte by byte, as transformers does; two ids with one spelling cannot round-trip and are refused."""
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        if spelled in vocab:
            raise GGUFError(f"{gguf.name}: tokenizer.ggml.tokens: ids {vocab[spelled]} and {index} are both "
                            f"{spelled!r}")
        vocab[spelled] = index
    return vocab


def _merges(gguf: GGUFFile) -> list[tuple[str, str]]:
    merges = gguf.strings("tokenizer.ggml.merges")
    pairs = [tuple(merge.split(" ")) for merge in merges]
    bad = next((i for i, pair in enumerate(pairs) if len(pair) != 2), None)
    if bad is not None:
        raise GGUFError(f"{gguf.name}: tokenizer.ggml.merges[{bad}] is {merges[bad]!r}, expected two tokens "
                        f"separated by one space")
    return pairs


def _token_types(gguf: GGUFFile, n_tokens: int) -> list[int]:
    types = gguf.integers("tokenizer.ggml.token_type", default=None)
    if types is None:
        return []
    if len(types) != n_tokens:
        raise GGUFError(f"{gguf.name}: tokenizer.ggml.token_type has {len(types)} entries for {n_tokens} tokens")
    return types.tolist()


def _added_tokens(gguf: GGUFFile, tokens: list[str], vocab: dict[str, int]) -> tuple[list, list]:
    """(special, plain) AddedTokens, matched whole in the text: the tokens marked control plus the BOS/EOS/UNK/PAD
    tokens (transformers registers those as special too), and the tokens marked user-defined. A control token spelled
    outside the byte alphabet is a llama.cpp mislabel that transformers skips (adding it would grow the vocabulary past
    the model's rows); so do we."""
    types = _token_types(gguf, len(tokens))
    alphabet = set(byte_alphabet().values())
    special = [token for token, kind in zip(tokens, types) if kind == CONTROL and set(token) <= alphabet]
    named = [_special_token(gguf, tokens, key) for key in SPECIAL_IDS.values()]
    special += [token for token in named if token is not None and token in vocab and token not in special]
    plain = [token for token, kind in zip(tokens, types) if kind == USER_DEFINED and token in vocab]
    return ([AddedToken(token, special=True, normalized=False) for token in special],
            [AddedToken(token, special=False, normalized=False) for token in plain])


def _post_processor(gguf: GGUFFile, tokens: list[str]) -> processors.TemplateProcessing:
    """BOS / EOS around each sequence where the file asks for them (`add_bos_token`, `add_eos_token`), as
    transformers' `update_post_processor` builds it; none for SmolLM2 (its chat template writes every marker)."""
    wanted = {"bos_token_id": gguf.value("tokenizer.ggml.add_bos_token", bool, False),
              "eos_token_id": gguf.value("tokenizer.ggml.add_eos_token", bool, False)}
    bos, eos = (_special_token(gguf, tokens, key) if on else None for key, on in wanted.items())

    def template(sequence: str, type_id: int) -> str:
        return " ".join(([f"{bos}:{type_id}"] if bos else []) + [f"${sequence}:{type_id}"]
                        + ([f"{eos}:{type_id}"] if eos else []))
    ids = {token: gguf.value(f"tokenizer.ggml.{key}", int) for token, key in ((bos, "bos_token_id"),
                                                                            (eos, "eos_token_id")) if token}
    return processors.TemplateProcessing(single=template("A", 0), pair=f"{template('A', 0)} {template('B', 1)}",
                                         special_tokens=sorted(ids.items()))


def _special_token(gguf: GGUFFile, tokens: list[str], key: str) -> str | None:
    """The token under id `tokenizer.ggml.<key>` (bos_token_id, ...), or None when the file names none."""
    token_id = gguf.value(f"tokenizer.ggml.{key}", int, None)
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise GGUFError(f"{gguf.name}: tokenizer.ggml.{key} is {token_id}, outside the vocabulary of {len(tokens)}")
    return tokens[token_id]


def build_tokenizer(gguf: GGUFFile) -> Tokenizer:
    """The byte-level BPE tokenizer `gguf`'s metadata describes."""
    model = gguf.value("tokenizer.ggml.model", str)
    if model != "gpt2":
        raise GGUFError(f"{gguf.name}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is rebuilt")
    pre = gguf.value("tokenizer.ggml.pre", str, "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{gguf.name}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer this converter does not rebuild "
                        f"(it knows {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens = gguf.strings("tokenizer.ggml.tokens")
    vocab = _vocabulary(gguf, tokens)
    try:
        bpe = models.BPE(vocab=vocab, merges=_merges(gguf), dropout=None, continuing_subword_prefix="",
                         end_of_word_suffix="", fuse_unk=False)
    except Exception as err:  # tokenizers raises a bare Exception for a merge of unknown tokens
        raise GGUFError(f"{gguf.name}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({err})") from None
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    special, plain = _added_tokens(gguf, tokens, vocab)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)
    tokenizer.post_processor = _post_processor(gguf, tokens)
    return tokenizer


def tokenizer_config(gguf: GGUFFile, model_max_length: int) -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast (our own code reads tokenizer.json alone): the
    special tokens by name, the BOS/EOS flags, and the file's chat template."""
    tokens = gguf.strings("tokenizer.ggml.tokens")
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update({name: _special_token(gguf, tokens, key) for name, key in SPECIAL_IDS.items()})
    config["add_bos_token"] = gguf.value("tokenizer.ggml.add_bos_token", bool, False)
    config["add_eos_token"] = gguf.value("tokenizer.ggml.add_eos_token", bool, False)
    config["model_max_length"] = model_max_length
    template = gguf.value("tokenizer.chat_template", str, None)
    if template is not None:
        config["chat_template"] = template
    return config
