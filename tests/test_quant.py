"""4-bit base linears (ref.quant) against hand-computed NF4, bitsandbytes' own functions and dense float32 models.

Every reference here is computed independently of `Linear4bit`: the NF4 table from the QLoRA paper, codes decoded by
hand from the packed bytes, bitsandbytes' `quantize_4bit`/`dequantize_4bit` called directly, dense `F.linear`.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bitsandbytes.utils import pack_dict_to_tensor, unpack_tensor_to_dict
from safetensors.torch import load_file, save_file

from conftest import random_linear, tiny_llava
from ref import quant, weights
from ref.llava import Llava
from ref.quant import Linear4bit, QuantConfig, QuantError
from ref.weights import CheckpointError
from harness.console import LoadProgressLine

# QLoRA paper (Dettmers et al. 2023), appendix E: the 16 NF4 levels.
NF4_LEVELS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
              1.0]


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Packed bytes -> n 4-bit codes: two per byte, the first value in the high nibble."""
    flat = packed.flatten()
    return torch.stack([flat >> 4, flat & 15], dim=1).flatten()[:n].long()


# --- the quantized representation, checked by hand --------------------------------------------------------------------


def test_nf4_levels_are_the_qlora_table():
    module = Linear4bit.from_linear(random_linear(64, 8), double_quant=False)
    torch.testing.assert_close(module.quant_map, torch.tensor(NF4_LEVELS), rtol=0, atol=1e-7)


def test_codes_are_nearest_nf4_levels_of_block_scaled_weights():
    """absmax_b = max |W| over block b; code = the NF4 level nearest W / absmax_b; W_dq = level * absmax_b."""
    linear = random_linear(128, 6, bias=False)
    module = Linear4bit.from_linear(linear, blocksize=64, double_quant=False)
    blocks = linear.weight.detach().reshape(-1, 64)  # row-major [out, in], 64 values per block
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    torch.testing.assert_close(module.absmax, absmax, rtol=0, atol=0)
    levels = torch.tensor(NF4_LEVELS)
    nearest = (blocks / absmax[:, None]).unsqueeze(-1).sub(levels).abs().argmin(-1).flatten()  # (out * in,)
    codes = unpack_codes(module.weight, linear.weight.numel())
    assert (codes == nearest).float().mean() > 0.999  # exact but for ties at midpoints, if any
    by_hand = (levels[codes].reshape(-1, 64) * absmax[:, None]).reshape(6, 128)
    torch.testing.assert_close(module.dequantize(), by_hand, rtol=0, atol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (64, False), (128, True), (32, False)])
def test_packing_equals_bitsandbytes_called_directly(quant_type, blocksize, double_quant):
    linear = random_linear(192, 40)
    module = Linear4bit.from_linear(linear, quant_type, blocksize, double_quant)
    packed, state = bnbF.quantize_4bit(linear.weight.detach(), blocksize=blocksize, quant_type=quant_type,
                                       compress_statistics=double_quant)
    assert torch.equal(module.weight, packed)
    assert module.weight.numel() == 192 * 40 // 2  # 4 bits per weight
    torch.testing.assert_close(module.dequantize(), bnbF.dequantize_4bit(packed, state), rtol=0, atol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(40, 192), (70, 130), (3, 100)])  # whole blocks per row, 32 rows per block, ...
@pytest.mark.parametrize("double_quant", [True, False])
def test_chunked_quantization_is_bit_identical_to_one_call(quant_type, shape, double_quant):
    weight = torch.randn(*shape) * 0.05
    packed, state = quant.quantize_weight(weight, quant_type, 64, double_quant, chunk_elements=200)  # many chunks
    packed_bnb, state_bnb = bnbF.quantize_4bit(weight, blocksize=64, quant_type=quant_type,
                                               compress_statistics=double_quant)
    assert torch.equal(packed, packed_bnb)
    assert torch.equal(state.absmax, state_bnb.absmax)
    if double_quant:
        assert torch.equal(state.offset, state_bnb.offset)
        assert torch.equal(state.state2.absmax, state_bnb.state2.absmax)
        assert torch.equal(state.state2.code, state_bnb.state2.code)
    assert state == state_bnb  # bitsandbytes' own comparison of every remaining field


# --- forward and backward ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(128, 96), (130, 70), (64, 1)])  # odd in/out features, a single output
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_and_backward_equal_dense_with_dequantized_weight(quant_type, shape, double_quant):
    in_features, out_features = shape
    linear = random_linear(in_features, out_features)
    module = Linear4bit.from_linear(linear, quant_type, 64, double_quant)
    packed, state = bnbF.quantize_4bit(linear.weight.detach(), blocksize=64, quant_type=quant_type,
                                       compress_statistics=double_quant)
    w_dq = bnbF.dequantize_4bit(packed, state)  # (out, in), bitsandbytes directly
    x = torch.randn(2, 3, in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = module(x), F.linear(x_ref, w_dq, linear.bias.detach())  # (2, 3, out)
    torch.testing.assert_close(y, y_ref)  # float32 rounding
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_weight_error_is_nf4_sized():
    linear = random_linear(256, 128)
    w = linear.weight.detach()
    error = (Linear4bit.from_linear(linear).dequantize() - w).norm() / w.norm()
    print(f"\nNF4 relative weight error (Gaussian weights, blocksize 64, double quant): {error:.4f}")
    assert 0.03 < error < 0.15  # about 0.09 for Gaussian weights; 0 would mean nothing was quantized


def test_no_dense_weight_is_kept_or_saved_for_backward():
    out_features, in_features = 48, 64
    module = Linear4bit.from_linear(random_linear(in_features, out_features))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(5, in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    y.sum().backward()
    dense_shapes = {(out_features, in_features), (in_features, out_features)}
    assert not [s for s in saved if s[0] in dense_shapes and s[1].is_floating_point], saved
    held = [t for t in list(module.parameters()) + list(module.buffers()) + list(vars(module).values())
            if isinstance(t, torch.Tensor)]
    assert all(t.numel() < out_features * in_features for t in held)


def test_float64_is_refused_not_miscomputed():
    module = Linear4bit.from_linear(random_linear(64, 8))
    with pytest.raises(QuantError, match="float64"):
        module(torch.randn(2, 64, dtype=torch.float64))
    module.compute_dtype = torch.float32  # an explicit compute dtype: cast in, cast back
    x = torch.randn(2, 64, dtype=torch.float64)
    y = module(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.linear(x, module.dequantize().double(), module.bias.double()))
    with pytest.raises(QuantError, match="float64"):
        quant.quantize_weight(torch.randn(4, 64, dtype=torch.float64))


def test_compute_dtype_bfloat16():
    module = Linear4bit.from_linear(random_linear(64, 16), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = module(x)
    assert y.dtype == torch.float32  # cast back to the input's dtype
    want = F.linear(x.bfloat16(), module.dequantize(torch.bfloat16), module.bias.bfloat16()).float()
    torch.testing.assert_close(y, want)


# --- moving between devices and dtypes --------------------------------------------------------------------------------


def test_half_keeps_quant_state_dtypes():
    module = Linear4bit.from_linear(random_linear(64, 16))
    before = {name: t.clone() for name, t in module.named_buffers()}
    module.half()
    for name, t in module.named_buffers():
        assert torch.equal(t, before[name]), name  # not rounded to float16
    assert module.bias.dtype == torch.float16  # an ordinary parameter follows the cast
    x = torch.randn(2, 64, dtype=torch.float16)
    torch.testing.assert_close(module(x), F.linear(x, module.dequantize(torch.float16), module.bias))


def test_quant_state_follows_module_to():
    module = Linear4bit.from_linear(random_linear(64, 16))
    module.to("meta")  # a device move without a second device: every piece must follow
    state = module.quant_state()
    assert {state.absmax.device.type, state.code.device.type, state.state2.absmax.device.type,
            state.offset.device.type, module.weight.device.type} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moves_to_cuda_and_back():
    linear = random_linear(128, 32)
    module = Linear4bit.from_linear(linear)
    x = torch.randn(4, 128)
    y_cpu = module(x)
    module.cuda()
    y_gpu = module(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    module.cpu()
    torch.testing.assert_close(module(x), y_cpu)


# --- state dict: bitsandbytes' own serialisation ----------------------------------------------------------------------


def test_state_dict_round_trip_through_safetensors_is_bit_identical(tmp_path):
    module = Linear4bit.from_linear(random_linear(130, 70))
    state = module.state_dict()
    assert "weight.quant_state.bitsandbytes__nf4" in state and state["weight"].dtype == torch.uint8
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "q.safetensors")
    loaded = Linear4bit(130, 70, bias=True, device="meta")  # built empty, filled by load_state_dict
    loaded.load_state_dict(load_file(tmp_path / "q.safetensors"))
    for name, t in module.named_buffers():
        assert torch.equal(getattr(loaded, name), t), name
    x = torch.randn(3, 130)
    assert torch.equal(loaded(x), module(x))
    # bitsandbytes reads the same state back with its own deserialiser
    raw = load_file(tmp_path / "q.safetensors")
    state_bnb = bnbF.QuantState.from_dict({k[7:]: v for k, v in raw.items() if k.startswith("weight.")}, "cpu")
    torch.testing.assert_close(bnbF.dequantize_4bit(raw["weight"], state_bnb), module.dequantize(), rtol=0, atol=0)


def test_loading_a_dense_weight_quantizes_it():
    linear = random_linear(64, 32)
    module = Linear4bit(64, 32, bias=True, device="meta")
    module.load_state_dict(linear.state_dict())
    assert torch.equal(module.weight, Linear4bit.from_linear(linear).weight)


def test_state_dict_with_other_settings_is_refused():
    state = Linear4bit.from_linear(random_linear(128, 32), blocksize=64).state_dict()
    with pytest.raises(RuntimeError, match="blocksize"):
        Linear4bit(128, 32, bias=True, blocksize=128).load_state_dict(state)
    with pytest.raises(RuntimeError, match="does not fit"):
        Linear4bit(128, 32, bias=True).load_state_dict({"weight": torch.randn(32, 64), "bias": torch.zeros(32)})
    with pytest.raises(RuntimeError, match="without its quant state"):
        Linear4bit(128, 32, bias=True).load_state_dict({"weight": state["weight"], "bias": state["bias"]})


def test_bad_settings_are_refused():
    with pytest.raises(QuantError, match="quant_type"):
        QuantConfig(quant_type="int4")
    with pytest.raises(QuantError, match="blocksize"):
        Linear4bit(64, 8, blocksize=48)
    with pytest.raises(QuantError, match="compute_dtype"):
        QuantConfig(compute_dtype=torch.float64)
    with pytest.raises(QuantError, match="2-D"):
        quant.quantize_weight(torch.randn(64))
    with pytest.raises(QuantError, match="nothing to quantize"):
        quant.quantize_model(nn.Sequential(nn.Linear(64, 64)), QuantConfig(scope="language_model.layers."))


# --- a tiny LLaVA -----------------------------------------------------------------------------------------------------


def inputs(model: Llava, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n_img = model.config.image_seq_length
    ids = torch.cat([torch.tensor([1]), torch.full((n_img,), model.config.image_token_index),
                     torch.randint(3, 120, (10,), generator=g)])[None]
    pixels = torch.randn(1, 3, 30, 30, generator=g)
    return ids, pixels


DECODER_LINEARS = {f"language_model.layers.{i}.{m}" for i in range(2) for m in
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def test_only_decoder_layer_linears_are_quantized():
    model = tiny_llava()
    names = quant.quantize_model(model)
    assert set(names) == DECODER_LINEARS
    four_bit = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert four_bit == DECODER_LINEARS
    dense = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert "lm_head" in dense and "multi_modal_projector.linear_1" in dense
    assert any(n.startswith("vision_tower.") for n in dense)
    assert isinstance(model.language_model.embed_tokens, nn.Embedding)


@torch.no_grad()
def test_4bit_llava_equals_dense_llava_with_dequantized_weights():
    model = tiny_llava()
    quant.quantize_model(model)
    dense = tiny_llava()  # the same weights, then each decoder linear replaced by bitsandbytes' dequantization
    for name in DECODER_LINEARS:
        linear = dense.get_submodule(name)
        packed, state = bnbF.quantize_4bit(linear.weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        linear.weight.copy_(bnbF.dequantize_4bit(packed, state))
    ids, pixels = inputs(model)
    torch.testing.assert_close(model(ids, pixel_values=pixels), dense(ids, pixel_values=pixels))


@torch.no_grad()
def test_4bit_llava_logits_move_as_much_as_weight_noise_of_nf4_size():
    """NF4 rounds each weight by about 9% of its block's scale. The logits of the 4-bit model must move about as much
    as those of the dense model whose decoder weights get random noise of the same relative size: far less would
    mean the 4-bit path is not used, far more that it is wrong. (The exact check is the test above.)"""
    original = tiny_llava()
    model = tiny_llava()
    quant.quantize_model(model)
    noisy = tiny_llava()
    generator = torch.Generator().manual_seed(7)
    weight_errors = []
    for name in DECODER_LINEARS:
        weight = noisy.get_submodule(name).weight
        weight_error = model.get_submodule(name).dequantize() - weight  # (out, in), NF4's rounding of this weight
        weight_errors.append((weight_error.norm() / weight.norm()).item())
        weight.add_(torch.randn(weight.shape, generator=generator) * weight_error.std())
    ids, pixels = inputs(model)
    want = original(ids, pixel_values=pixels)
    error = ((model(ids, pixel_values=pixels) - want).norm() / want.norm()).item()
    noise_error = ((noisy(ids, pixel_values=pixels) - want).norm() / want.norm()).item()
    print(f"\nNF4 weight error {sum(weight_errors) / len(weight_errors):.3f}; logits relative error: 4-bit "
          f"{error:.4f}, equal-size noise {noise_error:.4f}")
    assert 0.05 < sum(weight_errors) / len(weight_errors) < 0.15  # NF4's known rounding (QLoRA paper: ~0.09)
    assert noise_error / 3 < error < 3 * noise_error


# --- streaming quantize-on-load and the pre-quantized checkpoint ------------------------------------------------------


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    weights.save_model(tiny_llava(), folder)
    return folder


def test_streaming_load_quantizes_each_decoder_linear(dense_folder):
    model = weights.load_model(dense_folder, quantize="nf4")  # the public entry point
    reference = tiny_llava()
    quant.quantize_model(reference)
    assert {n for n, m in model.named_modules() if isinstance(m, Linear4bit)} == DECODER_LINEARS
    for name in DECODER_LINEARS:
        assert torch.equal(model.get_submodule(name).weight, reference.get_submodule(name).weight), name
    ids, pixels = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pixel_values=pixels), reference(ids, pixel_values=pixels))


def test_prequantized_round_trip_is_bit_identical_and_skips_quantization(dense_folder, tmp_path, monkeypatch):
    model = weights.load_model(dense_folder, quantize=QuantConfig(quant_type="fp4", blocksize=128))
    weights.save_quantized(model, tmp_path)

    def no_quantization(*args, **kwargs):
        raise AssertionError("a pre-quantized checkpoint must not be quantized again")

    monkeypatch.setattr(quant, "quantize_weight", no_quantization)
    loaded = weights.load_model(tmp_path)  # recognised as pre-quantized by its config.json
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert set(state) == set(loaded_state)
    for key, t in state.items():
        assert torch.equal(loaded_state[key], t), key
    m = loaded.get_submodule("language_model.layers.0.mlp.down_proj")
    assert (m.quant_type, m.blocksize, m.double_quant) == ("fp4", 128, True)
    ids, pixels = inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixel_values=pixels), model(ids, pixel_values=pixels))


def test_loading_progress_counts_every_tensor_read(dense_folder, tmp_path, capsys):
    weights.load_model(dense_folder, quantize="nf4", progress=LoadProgressLine())
    n_stored = len(load_file(dense_folder / "model.safetensors"))
    last = capsys.readouterr().err.splitlines()[-1]
    assert f" {n_stored}/{n_stored} " in last and "tensors/s" in last
    weights.save_quantized(weights.load_model(dense_folder, quantize="nf4"), tmp_path)
    weights.load_model(tmp_path, progress=LoadProgressLine())  # the dense tensors, then each packed 4-bit weight
    stored = load_file(tmp_path / "model.safetensors")
    n_weights = sum(1 for key in stored if ".weight." not in key)  # a packed weight's quant state: "<name>.weight.*"
    assert n_weights == n_stored
    assert f" {n_weights}/{n_weights} " in capsys.readouterr().err.splitlines()[-1]


def test_prequantized_checkpoint_with_a_broken_quant_state_is_refused(dense_folder, tmp_path):
    model = weights.load_model(dense_folder, quantize="nf4")
    weights.save_quantized(model, tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    key = "language_model.model.layers.1.mlp.up_proj.weight.absmax"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="up_proj"):
        weights.load_model(tmp_path)
    del tensors["language_model.model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="up_proj"):
        weights.load_model(tmp_path)


# --- non-finite values: never quantized, never loaded from a pre-quantized checkpoint ---------------------------------


@pytest.mark.parametrize("double_quant, suffix", [(False, "absmax"), (True, "nested_absmax"), (True, "quant_map"),
                                                  (True, "nested_quant_map")])
def test_prequantized_checkpoint_with_a_non_finite_quant_state_is_refused(dense_folder, tmp_path, double_quant,
                                                                          suffix):
    """Every 4-bit value is scaled through these tensors: one NaN makes a block, and then every output, NaN."""
    weights.save_quantized(weights.load_model(dense_folder, quantize=QuantConfig(double_quant=double_quant)), tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    key = f"language_model.model.layers.1.mlp.up_proj.weight.{suffix}"
    tensors[key][0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        weights.load_model(tmp_path)
    numel = tensors[key].numel()
    assert str(err.value) == f"{file}: tensor {key!r} holds non-finite values (1 NaN, 0 inf among {numel})"


def test_prequantized_checkpoint_with_a_non_finite_dense_tensor_or_offset_is_refused(dense_folder, tmp_path):
    weights.save_quantized(weights.load_model(dense_folder, quantize="nf4"), tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    norm = "language_model.model.layers.0.input_layernorm.weight"
    save_file({**tensors, norm: torch.full_like(tensors[norm], float("inf"))}, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"^{file}: tensor '{norm}' holds non-finite values \\(0 NaN, 64 inf"):
        weights.load_model(tmp_path)
    # the nested offset lives in the JSON quant state, which Python's json writes and reads NaN in
    key = "language_model.model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    state = unpack_tensor_to_dict(tensors[key])
    save_file({**tensors, key: pack_dict_to_tensor({**state, "nested_offset": float("nan")})}, file,
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        weights.load_model(tmp_path)
    assert str(err.value) == f"{file}: tensor {key!r} holds nested_offset nan, expected a finite number"


def test_non_finite_weights_are_not_quantized():
    weight = torch.randn(32, 64)
    weight[5, 7] = float("nan")
    with pytest.raises(QuantError, match=r"can only quantize a finite weight; this one holds non-finite values "
                                         r"\(1 NaN, 0 inf among 2048\)"):
        quant.quantize_weight(weight)
    model = tiny_llava()
    with torch.no_grad():
        model.language_model.layers[1].mlp.gate_proj.weight[0, 0] = float("inf")
    with pytest.raises(QuantError, match=r"^language_model\.layers\.1\.mlp\.gate_proj\.weight: can only quantize a "
                                         r"finite weight; this one holds non-finite values \(0 NaN, 1 inf"):
        quant.quantize_model(model)
    # a 4-bit state dict with a non-finite scale is refused by the module itself too
    module = Linear4bit.from_linear(random_linear(64, 32))
    state = {key: value.clone() for key, value in module.state_dict().items()}
    state["weight.nested_quant_map"][3] = float("nan")
    with pytest.raises(RuntimeError, match=r"weight\.nested_quant_map holds non-finite values \(1 NaN"):
        Linear4bit(64, 32, bias=True, device="meta").load_state_dict(state)
