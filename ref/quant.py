"""4-bit (NF4 / FP4) base linears for QLoRA, through bitsandbytes.

A weight W (out, in) is cut, in row-major order, into blocks of `blocksize` values; each block stores its absolute
maximum m_b and 4-bit codes q_i such that

    W_i ~= code[q_i] * m_b        (NF4: 16 levels at the quantiles of a normal distribution, scaled to [-1, 1])

With double quantization the per-block maxima are themselves stored as 8-bit codes over blocks of 256 (plus one fp32
scale per such block and a global offset), which brings the overhead from 0.5 to about 0.127 bits per weight.

`Linear4bit` keeps the packed codes and every tensor of bitsandbytes' `QuantState` as buffers and rebuilds the (cheap,
tensor-free) `QuantState` object on each call, so `module.to(device)` moves everything and nothing goes stale. Its
`state_dict` uses bitsandbytes' own serialisation (`QuantState.as_dict(packed=True)`, the layout transformers writes
for bnb-4bit checkpoints):

    {prefix}weight                                  packed codes, uint8 ((out * in + 1) // 2, 1)
    {prefix}weight.absmax                           per-block maxima (uint8 codes when double-quantized, else fp32)
    {prefix}weight.quant_map                        the 16 code values
    {prefix}weight.nested_absmax, .nested_quant_map double quantization only
    {prefix}weight.quant_state.bitsandbytes__nf4    JSON (as uint8): quant_type, blocksize, dtype, shape, nested_*
    {prefix}bias                                    if any, dense

Loading such a state dict restores the module bit for bit; loading a dense float `weight` of shape (out, in) into a
`Linear4bit` quantizes it on the spot. Reading and writing whole 4-bit checkpoints (quantize-on-load, the pre-quantized
format) is checkpoint I/O and lives in `ref.weights`; this module is the 4-bit linear and the quantization math.

Which linears are quantized is explicit (`QuantConfig.scope`): by default every nn.Linear of the decoder layers
(`language_model.layers.*`): not the embeddings, not the lm_head, not the vision tower or projector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
import torch.nn as nn

from ref.config import DTYPES, nonfinite_problem


class QuantError(ValueError):
    """A quantization setting, a weight or a quantized state dict that we cannot use."""


QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept
COMPUTE_DTYPES = tuple(DTYPES.values())  # float32, bfloat16, float16: bitsandbytes returns garbage for float64
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax values in blocks of 256 (fixed in quantize_4bit)
DEFAULT_SCOPE = "language_model.layers."
# The tensors bitsandbytes serialises a 4-bit weight's QuantState into, as suffixes after "<linear>.weight.".
QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                  "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")


@dataclass(frozen=True)
class QuantConfig:
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True  # also quantize the per-block maxima (QLoRA's "double quantization")
    compute_dtype: torch.dtype | None = None  # dtype of the matmul; None = the input's dtype
    scope: str = DEFAULT_SCOPE  # every nn.Linear whose name starts with this is quantized

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise QuantError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise QuantError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise QuantError(f"compute_dtype must be one of {COMPUTE_DTYPES} or None, got {self.compute_dtype}")


def as_quant_config(quantize: str | QuantConfig) -> QuantConfig:
    """`quantize="nf4"` / `"fp4"` (the other settings at their defaults) or a full QuantConfig."""
    return quantize if isinstance(quantize, QuantConfig) else QuantConfig(quant_type=quantize)


# bitsandbytes' CPU quantizer makes about 20 bytes of temporaries per weight (a float32 copy, |W|, the scaled values,
# int32 bucket indices): a 4096 x 11008 weight would need ~0.9 GB at once; 2^20 weights at a time need ~20 MB.
QUANTIZE_CHUNK_ELEMENTS = 1 << 20


def quantize_weight(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    chunk_elements: int = QUANTIZE_CHUNK_ELEMENTS) -> tuple[torch.Tensor, bnbF.QuantState]:
    """Dense (out, in) -> packed uint8 codes ((out * in + 1) // 2, 1) and their QuantState.

    Bit-identical to `bnbF.quantize_4bit(weight, blocksize, compress_statistics=double_quant, quant_type)`, computed
    in row chunks: the 4-bit blocks run over the row-major weight and each depends on its own 64 values only, so chunks
    that hold whole blocks quantize independently. Double quantization then runs on all the per-block maxima at once,
    exactly as quantize_4bit does it: offset = mean(absmax); 8-bit blockwise codes of absmax - offset, blocks of 256.
    """
    if weight.dim() != 2:
        raise QuantError(f"can only quantize a 2-D (out_features, in_features) weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in COMPUTE_DTYPES:
        raise QuantError(f"can only quantize float32/float16/bfloat16 weights, got {weight.dtype}")
    problem = nonfinite_problem(weight)  # a NaN block scale would turn its whole block, and every output, into NaN
    if problem:
        raise QuantError(f"can only quantize a finite weight; this one {problem}")
    weight = weight.detach()
    out_features, in_features = weight.shape
    rows_per_block_multiple = blocksize // math.gcd(in_features, blocksize)  # chunks must end on a block boundary
    rows = max(1, chunk_elements // (in_features * rows_per_block_multiple)) * rows_per_block_multiple
    packed_parts, absmax_parts = [], []
    for start in range(0, out_features, rows):
        packed, state = bnbF.quantize_4bit(weight[start:start + rows].contiguous(), blocksize=blocksize,
                                           compress_statistics=False, quant_type=quant_type)
        packed_parts.append(packed)  # (rows * in / 2, 1)
        absmax_parts.append(state.absmax)  # (rows * in / blocksize,) float32
    packed, absmax = torch.cat(packed_parts), torch.cat(absmax_parts)
    code = state.code
    if not double_quant:
        return packed, bnbF.QuantState(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                                       code=code, quant_type=quant_type)
    offset = absmax.mean()
    quantized_absmax, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return packed, bnbF.QuantState(absmax=quantized_absmax, shape=weight.shape, dtype=weight.dtype,
                                   blocksize=blocksize, code=code, quant_type=quant_type, offset=offset, state2=state2)


def _n_blocks(numel: int, blocksize: int) -> int:
    return math.ceil(numel / blocksize)


class Linear4bit(nn.Module):
    """y = x W^T + b with W stored in 4 bits; W is dequantized inside each call and never kept.

    Build it empty (on any device, "meta" included) and fill it with `set_weight(dense)` or `load_state_dict`, or
    convert an nn.Linear with `Linear4bit.from_linear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 weight_dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        QuantConfig(quant_type, blocksize, double_quant, compute_dtype)  # validates the settings
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype  # dtype of the weight before quantization: what dequantize() returns
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        # Placeholders of the exact shapes (so state dicts can be shape-checked); set_weight fills them.
        n = in_features * out_features
        n_blocks = _n_blocks(n, blocksize)
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(n_blocks, device=device,
                                                   dtype=torch.uint8 if double_quant else torch.float32))
        self.register_buffer("quant_map", torch.zeros(16, device=device))
        if double_quant:
            self.register_buffer("nested_absmax", torch.zeros(_n_blocks(n_blocks, NESTED_BLOCKSIZE), device=device))
            self.register_buffer("nested_quant_map", torch.zeros(256, device=device))
            self.register_buffer("nested_offset", torch.zeros((), device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """A 4-bit copy of `linear` (quantized now unless it lives on the meta device, then left empty)."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type, blocksize,
                     double_quant, compute_dtype, weight_dtype=weight.dtype, device=weight.device)
        if weight.device.type != "meta":
            module.set_weight(weight)
            if linear.bias is not None:
                module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return module

    # --- the quantized weight ---------------------------------------------------------------------------------------

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a dense (out, in) weight into this module, on the weight's device (what quantize-on-load calls)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise QuantError(f"weight of shape {tuple(weight.shape)} does not fit a 4-bit linear of "
                             f"{(self.out_features, self.in_features)} (out_features, in_features)")
        packed, state = quantize_weight(weight, self.quant_type, self.blocksize, self.double_quant)
        self.weight_dtype = weight.dtype
        self._set_state(packed, state)

    def _set_state(self, packed: torch.Tensor, state: bnbF.QuantState) -> None:
        # Assignment (not copy_) so that an empty module built on "meta" becomes real.
        self.weight = packed
        self.absmax, self.quant_map = state.absmax, state.code
        if self.double_quant:
            self.nested_absmax, self.nested_quant_map = state.state2.absmax, state.state2.code
            self.nested_offset = state.offset.reshape(()).float()

    def quant_state(self) -> bnbF.QuantState:
        """bitsandbytes' QuantState over this module's buffers (built per call: it holds no tensors of its own)."""
        state2, offset = None, None
        if self.double_quant:
            state2 = bnbF.QuantState(absmax=self.nested_absmax, code=self.nested_quant_map,
                                     blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
            offset = self.nested_offset
        return bnbF.QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                               code=self.quant_map, blocksize=self.blocksize, quant_type=self.quant_type,
                               dtype=self.weight_dtype, offset=offset, state2=state2)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out, in) the codes stand for (a fresh tensor; the module does not keep it)."""
        dense = bnbF.dequantize_4bit(self.weight, self.quant_state())  # (out, in) in weight_dtype
        return dense if dtype is None else dense.to(dtype)

    # --- forward ----------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        dtype = self.compute_dtype or input_dtype
        if dtype not in COMPUTE_DTYPES:
            # bitsandbytes returns garbage (no error) for float64 inputs: refuse rather than compute nonsense.
            raise QuantError(f"4-bit linear cannot compute in {dtype}; use float32, float16 or bfloat16 inputs or "
                             f"set compute_dtype")
        bias = None if self.bias is None else self.bias.to(dtype)
        # matmul_4bit dequantizes W into `dtype` inside the call (and again in backward), so no dense copy outlives it.
        out = bnb.matmul_4bit(x.to(dtype), self.weight.t(), quant_state=self.quant_state(), bias=bias)  # (..., out)
        return out.to(input_dtype)

    # --- device moves and dtype casts -------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # `model.half()` / `model.to(torch.bfloat16)` must not round the quantization state: its buffers follow the
        # device of a move but keep their dtypes (the bias, a normal parameter, is cast as usual).
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    # --- state dict in bitsandbytes' serialisation ------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + "weight"] = self.weight
        for key, value in self.quant_state().as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        def take(key):
            return state_dict[prefix + key] if prefix + key in state_dict else None

        weight = take("weight")
        if strict:  # keys under this prefix that are not ours (all of ours are "bias", "weight" and "weight.*")
            unexpected_keys.extend(key for key in state_dict if key.startswith(prefix) and key != prefix + "weight"
                                   and not key.startswith(prefix + "weight.")
                                   and not (key == prefix + "bias" and self.bias is not None))
        if self.bias is not None:
            bias = take("bias")
            if bias is None:
                missing_keys.append(prefix + "bias")
            elif bias.shape != self.bias.shape:
                error_msgs.append(f"{prefix}bias: shape {tuple(bias.shape)}, expected {tuple(self.bias.shape)}")
            elif self.bias.is_meta:  # an empty module built on meta: take the tensor as it comes
                self.bias = nn.Parameter(bias.detach().clone(), requires_grad=self.bias.requires_grad)
            else:
                with torch.no_grad():
                    self.bias.copy_(bias)
        if weight is None:
            missing_keys.append(prefix + "weight")
            return
        if weight.is_floating_point():  # a dense checkpoint: quantize as it arrives
            try:
                self.set_weight(weight)
            except QuantError as err:
                error_msgs.append(f"{prefix}weight: {err}")
            return
        quant_keys = {key[len(prefix + "weight."):]: value for key, value in state_dict.items()
                      if key.startswith(prefix + "weight.")}
        try:
            self.load_packed(weight, quant_keys)
        except (QuantError, ValueError, KeyError, AssertionError) as err:
            error_msgs.append(f"{prefix}weight: {err}")

    def load_packed(self, packed: torch.Tensor, quant_keys: dict) -> None:
        """Restore from `weight` + `weight.*` tensors written by `_save_to_state_dict` (bitsandbytes' layout)."""
        if not quant_keys:
            raise QuantError("packed 4-bit weight without its quant state (weight.absmax, weight.quant_map, "
                             "weight.quant_state.bitsandbytes__*)")
        state = bnbF.QuantState.from_dict(dict(quant_keys), device=packed.device)
        expected = dict(quant_type=self.quant_type, blocksize=self.blocksize, nested=self.double_quant,
                        shape=torch.Size((self.out_features, self.in_features)))
        found = dict(quant_type=state.quant_type, blocksize=state.blocksize, nested=state.nested, shape=state.shape)
        if found != expected:
            raise QuantError(f"quantized checkpoint has {found}, this module expects {expected}")
        if packed.dtype != torch.uint8 or packed.numel() != self.weight.numel():
            raise QuantError(f"packed weight of {packed.dtype} {tuple(packed.shape)}, expected uint8 "
                             f"{tuple(self.weight.shape)}")
        found_parts = {"absmax": state.absmax, "quant_map": state.code}
        if state.nested:  # the offset comes from the JSON quant state
            found_parts.update(nested_absmax=state.state2.absmax, nested_quant_map=state.state2.code,
                               nested_offset=state.offset.reshape(()).float())
        for name, tensor in found_parts.items():
            mine = getattr(self, name)
            if tensor.shape != mine.shape or tensor.dtype != mine.dtype:
                raise QuantError(f"weight.{name} is {tensor.dtype} {tuple(tensor.shape)}, expected {mine.dtype} "
                                 f"{tuple(mine.shape)}")
            problem = nonfinite_problem(tensor)  # every 4-bit value is scaled through these
            if problem:
                raise QuantError(f"weight.{name} {problem}")
        self.weight_dtype = state.dtype
        self._set_state(packed.reshape(self.weight.shape).clone(), state)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


# ---------------------------------------------------------------------------------------------------------------------
# Choosing and swapping the linears of a model


def quantizable_linears(model: nn.Module, scope: str = DEFAULT_SCOPE) -> list[str]:
    """Names of the nn.Linear modules to quantize: those whose name starts with `scope`."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(scope)]


def quantize_model(model: nn.Module, config: QuantConfig = QuantConfig()) -> list[str]:
    """Replace, in place, every nn.Linear in `config.scope` by a Linear4bit; returns their names.

    On the meta device the new modules are empty shells for the loader to fill (`set_weight` / `load_state_dict`);
    otherwise each weight is quantized now.
    """
    names = quantizable_linears(model, config.scope)
    if not names:
        raise QuantError(f"no nn.Linear module name starts with {config.scope!r}: nothing to quantize")
    for name in names:
        linear = model.get_submodule(name)
        try:
            quantized = Linear4bit.from_linear(linear, config.quant_type, config.blocksize, config.double_quant,
                                               config.compute_dtype)
        except QuantError as err:
            raise QuantError(f"{name}.weight: {err}") from None
        model.set_submodule(name, quantized)
    return names


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (what a loaded model costs in memory)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
