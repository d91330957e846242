"""Helpers the test files share: the public data sets in ../shared, small files in published schemas, random linears
and a tiny LLaVA built in memory. Test files import them by name (`from conftest import write_csv`)."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ref.config import LlavaConfig, TextConfig, VisionConfig
from ref.llava import Llava
from ref.adapters import save_adapter
from ref.lora import LoraConfig, add_lora, lora_modules
from ref.weights import load_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"


def shared(name: str) -> Path:
    """A file of ../shared/data, or a skip saying it is missing (a user's clone has no ../shared)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"../shared not found: {path}")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    """One line per item: objects as JSON, strings as they are (so tests can write broken lines too)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def random_linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    """An nn.Linear with N(0, 0.05) weights (and bias), from its own seed."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
        if bias:
            linear.bias.normal_(0, 0.05)
    return linear


def tiny_config() -> LlavaConfig:
    """Two layers each side, grouped-query attention, a 5x5 grid of image patches."""
    return LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            image_size=30, patch_size=6),
        text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
        image_token_index=126, pad_token_id=127)


def tiny_llava(seed: int = 0, config: LlavaConfig | None = None) -> Llava:
    """A random tiny LLaVA in eval mode: every parameter N(0, 0.1), norm weights around 1."""
    torch.manual_seed(seed)
    model = Llava(config or tiny_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def randomize_adapters(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """LoRA's B starts at zero (a fresh adapter adds nothing); draw it N(0, scale) so that the update shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.copy_(scale * torch.randn(module.lora_B.weight.shape, generator=generator))


def write_random_adapter(model_dir: Path, folder: Path, seed: int = 1) -> Path:
    """A LoRA adapter (r=2) for the checkpoint in `model_dir` with random (nonzero) B, so the adapted model differs
    from the base, saved in peft's format."""
    model = load_model(model_dir)
    config = LoraConfig(r=2, alpha=4.0)
    add_lora(model, config)
    randomize_adapters(model, seed, scale=0.5)
    return save_adapter(model, folder, config)


# The words the tiny judges answer in, each one token of their tokenizer (weights_tools.make_tiny extra_words).
JUDGE_ANSWERS = ("safe", "unsafe", "Yes", "No", "maybe")


def judge_words() -> tuple[str, ...]:
    """The answers and every word of the judges' prompt templates, as byte-level BPE sees them (" word" -> "Ġword"):
    merged into single tokens, LlamaGuard's prompt is ~700 tokens instead of ~3000 bytes, and a test runs faster."""
    templates = " ".join(path.read_text() for path in sorted((REPO / "evals" / "judge_prompts").glob("*.txt")))
    words = sorted({w.replace(" ", "Ġ") for w in re.findall(r" ?[A-Za-z]+", templates)})
    return JUDGE_ANSWERS + tuple(w for w in words if w not in JUDGE_ANSWERS)


def answers_always(answer: str):
    """A `model_edit` for weights_tools.make_tiny.write_tiny_checkpoint: greedy decoding then answers `answer` and EOS
    to any prompt. The layers add nothing (their output projections are zero), so the last hidden state is the last
    token's embedding; every embedding has 10 in dimension 0, which the head reads as `answer`, and `answer`'s own
    embedding also has 30 in dimension 1, which the head reads as EOS: a token other than `answer` is followed by
    `answer`, and `answer` by EOS."""
    def edit(model, tokenizer):
        answer_id, eos_id = tokenizer.token_to_id(answer), tokenizer.token_to_id("</s>")
        assert answer_id is not None, f"{answer!r} is not one token: add it to JUDGE_ANSWERS"
        decoder = model.language_model
        with torch.no_grad():
            for layer in decoder.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            decoder.embed_tokens.weight[:, :2] = torch.tensor([10.0, 0.0])
            decoder.embed_tokens.weight[answer_id, 1] = 30.0
            decoder.norm.weight.fill_(1.0)
            model.lm_head.weight.zero_()
            model.lm_head.weight[answer_id, 0] = 1.0
            model.lm_head.weight[eos_id, 1] = 1.0
    return edit


def write_tiny_judge(folder: Path, answer: str) -> Path:
    """A tiny text-only LLaMA checkpoint (a judge model's architecture) that answers `answer` to every prompt."""
    from weights_tools.make_tiny import write_tiny_checkpoint
    return write_tiny_checkpoint(folder, text_only=True, extra_words=judge_words(), model_edit=answers_always(answer),
                                 max_position_embeddings=2048)


def evaluate(argv: list[str]) -> dict:
    """eval.py on these options in one process, its errors raised (main turns them into one line and exit status 2)."""
    import eval as eval_py  # the program, imported only by the tests that run it

    return eval_py.evaluate_or_rejudge(eval_options(argv))


def eval_options(argv: list[str]):
    """eval.py's options resolved as its main resolves them, in one process."""
    import eval as eval_py
    from evals.options import parse_command_line, resolve_options
    from ref.distributed import Distributed

    return resolve_options(parse_command_line(argv, eval_py.CATALOG), eval_py.CATALOG, Distributed(), eval_py.ROOT)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is faster than two, and much faster when other processes share the cores. A module
    asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------------
# The reliability catalogue's checks (tests/test_reliability*.py): user files unchanged, one-line errors


def fingerprint(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the given folders (or of the files given): what must not change."""
    found = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def error_of(main, argv: list[str], capsys) -> str:
    """Run a program's main; it must exit with status 2 and one line `PROG: error: ...`, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert ": error: " in err[-1], err
    return err[-1]
