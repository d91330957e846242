"""A text-only LlamaForCausalLM (the architecture of the LLM judges) on our decoder: transformers writes the checkpoint
with save_pretrained, our strict streaming loader reads it, and the logits and greedy generations are transformers'."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (tests/requirements.txt)")

from ref.data import DataError, load_processor  # noqa: E402
from ref.quant import Linear4bit  # noqa: E402
from ref.weights import load_model  # noqa: E402
from weights_tools.make_tiny import build_tokenizer  # noqa: E402


def hf_llama(seed: int = 0):
    tokenizer = build_tokenizer()
    vocab = -(-tokenizer.get_vocab_size(with_added_tokens=True) // 64) * 64
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rms_norm_eps=1e-5, rope_theta=500.0, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=tokenizer.token_to_id("<pad>"))
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("eager")  # the textbook attention our reference computes
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model, tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The same random LlamaForCausalLM saved whole and in shards, with a tokenizer.json beside each."""
    model, tokenizer = hf_llama()
    folders = {}
    for name, shard in (("single", "10GB"), ("sharded", "40KB")):
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, max_shard_size=shard)
        tokenizer.save(str(folder / "tokenizer.json"))
        folders[name] = folder
    assert (folders["sharded"] / "model.safetensors.index.json").is_file()
    return model, folders


def batch():
    ids = torch.tensor([[0, 0, 1, 70, 71, 72, 73], [1, 80, 81, 82, 83, 84, 85]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # the first row left padded
    return ids, mask


@pytest.mark.parametrize("layout", ["single", "sharded"])
@torch.no_grad()
def test_logits_equal_transformers(saved, layout):
    hf, folders = saved
    ours = load_model(folders[layout])
    assert ours.config.text_only and not hasattr(ours, "vision_tower")
    ids, mask = batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real])


@torch.no_grad()
def test_greedy_generation_equals_transformers(saved):
    hf, folders = saved
    ours = load_model(folders["single"])
    ids = torch.tensor([[1, 70, 71, 72]])
    want = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                       pad_token_id=hf.config.pad_token_id)[0, 4:]
    got = ours.generate(ids, max_new_tokens=12, eos_token_id=-1).sequences[0]
    assert got.tolist() == want.tolist()


@torch.no_grad()
def test_4bit_text_model_loads_and_follows_the_dense_one(saved):
    _, folders = saved
    dense, four_bit = load_model(folders["single"]), load_model(folders["single"], quantize="nf4")
    assert sum(isinstance(m, Linear4bit) for m in four_bit.modules()) == 2 * 7
    ids, mask = batch()
    want, got = dense(ids, attention_mask=mask), four_bit(ids, attention_mask=mask)
    assert torch.isfinite(got).all() and 0 < ((got - want).norm() / want.norm()).item() < 1.0


def test_processor_of_a_text_model_has_no_image_token_and_takes_no_images(saved):
    _, folders = saved
    processor = load_processor(folders["single"])
    assert processor.tokenizer.image_token_id is None and processor.image_seq_length is None
    assert processor("<s>hello there")["input_ids"].shape[0] == 1
    with pytest.raises(DataError, match="takes no images"):
        processor.images_to_tensor([])
    model = load_model(folders["single"])
    with pytest.raises(ValueError, match="text-only model has no vision tower"):
        model(torch.tensor([[1, 2]]), pixel_values=torch.zeros(1, 3, 8, 8))
