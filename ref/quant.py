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
`Linear4bit` quantizes it on the spot (that is the quantize-on-load hook of `ref.weights`).

Which linears are quantized is explicit (`QuantConfig.scope`): by default every nn.Linear of the decoder layers
(`language_model.layers.*`): not the embeddings, not the lm_head, not the vision tower or projector.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
import torch.nn as nn
from bitsandbytes.utils import unpack_tensor_to_dict
from safetensors.torch import save_file

from ref import weights  # layouts, headers, streaming (ref.weights.load_model calls back here for quantize=...)
from ref.config import load_config
from ref.llava import Llava


class QuantError(ValueError):
    """A quantization setting, a weight or a quantized state dict that we cannot use."""


QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 would silently return garbage
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax values in blocks of 256 (fixed in quantize_4bit)
DEFAULT_SCOPE = "language_model.layers."


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
        """Quantize a dense (out, in) weight into this module, on the weight's device (the quantize-on-load hook)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise QuantError(f"weight of shape {tuple(weight.shape)} does not fit a 4-bit linear of "
                             f"{(self.out_features, self.in_features)} (out_features, in_features)")
        packed, state = quantize_weight(weight, self.quant_type, self.blocksize, self.double_quant)
        self.weight_dtype = weight.dtype
        self._set_state(packed, state)

    def load_weight_(self, param_name: str, tensor: torch.Tensor) -> None:
        """The streaming loader's hook (`ref.weights.place_tensor_default`): quantize "weight", keep "bias" dense."""
        if param_name == "weight":
            self.set_weight(tensor)
        elif param_name == "bias" and self.bias is not None:
            if tuple(tensor.shape) != (self.out_features,):
                raise QuantError(f"bias of shape {tuple(tensor.shape)} does not fit {self.out_features} outputs")
            self.bias = nn.Parameter(tensor, requires_grad=False)
        else:
            raise QuantError(f"a 4-bit linear has no parameter {param_name!r}")

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
            self._load_packed(weight, quant_keys)
        except (QuantError, ValueError, KeyError, AssertionError) as err:
            error_msgs.append(f"{prefix}weight: {err}")

    def _load_packed(self, packed: torch.Tensor, quant_keys: dict) -> None:
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
        if state.nested:
            found_parts.update(nested_absmax=state.state2.absmax, nested_quant_map=state.state2.code)
        for name, tensor in found_parts.items():
            mine = getattr(self, name)
            if tensor.shape != mine.shape or tensor.dtype != mine.dtype:
                raise QuantError(f"weight.{name} is {tensor.dtype} {tuple(tensor.shape)}, expected {mine.dtype} "
                                 f"{tuple(mine.shape)}")
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


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


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
        set_submodule(model, name, Linear4bit.from_linear(linear, config.quant_type, config.blocksize,
                                                          config.double_quant, config.compute_dtype))
    return names


def dequantize_model(model: nn.Module) -> list[str]:
    """Replace, in place, every Linear4bit by a dense nn.Linear holding its dequantized weight; returns their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, Linear4bit)]
    for name in names:
        set_submodule(model, name, dense_linear(model.get_submodule(name)))
    return names


def dense_linear(module: Linear4bit, dtype: torch.dtype | None = None) -> nn.Linear:
    weight = module.dequantize(dtype)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (what a loaded model costs in memory)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# ---------------------------------------------------------------------------------------------------------------------
# Loading: quantize on load, or read an already-quantized checkpoint

QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                  "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")  # after "<linear>.weight."


def as_quant_config(quantize: str | QuantConfig) -> QuantConfig:
    """`quantize="nf4"` / `"fp4"` (the other settings at their defaults) or a full QuantConfig."""
    return quantize if isinstance(quantize, QuantConfig) else QuantConfig(quant_type=quantize)


def is_quantized_checkpoint(path: str | Path) -> bool:
    """A folder written by `save_quantized` (its config.json says bitsandbytes 4-bit)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        quantization = json.loads(file.read_text()).get("quantization_config") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False  # the loader reports a broken config.json itself
    return quantization.get("quant_method") == "bitsandbytes" and bool(quantization.get("load_in_4bit"))


def load_quantized_model(path: str | Path, quantize: str | QuantConfig | None = "nf4",
                         dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                         vision_dir: str | Path | None = None, kernels=None) -> nn.Module:
    """A Llava whose decoder linears are 4-bit, streamed: meta model, then one tensor at a time.

    A dense checkpoint is quantized as it arrives (each decoder weight is cast to `dtype`, quantized on `device`, and
    dropped): peak memory is the 4-bit model plus about one tensor. A checkpoint written by `save_quantized` is read
    as stored (no quantization; `quantize` then only sets the compute_dtype).
    """
    if is_quantized_checkpoint(path):
        compute_dtype = as_quant_config(quantize).compute_dtype if quantize is not None else None
        return _load_prequantized(path, dtype, device, compute_dtype, kernels)
    config = as_quant_config(quantize or "nf4")
    checkpoint = weights.open_checkpoint(path, vision_dir, kernels)  # every key, shape and dtype checked first
    with torch.device("meta"):
        model = Llava(checkpoint.config, kernels)
    quantize_model(model, config)  # empty 4-bit shells in place of the decoder linears
    with TensorReader() as reader:
        for name, info in checkpoint.entries.items():
            owner, _, param_name = name.rpartition(".")
            tensor = reader.read(info.file, info.key).to(device=device, dtype=dtype)
            weights.place_tensor_default(model.get_submodule(owner), param_name, tensor)  # -> Linear4bit.load_weight_
            del tensor  # a quantized weight's full-precision copy goes here
    return _finish(model, checkpoint.folder)


class TensorReader:
    """Reads safetensors tensors with plain file reads into fresh memory, one at a time.

    safetensors' `safe_open` memory-maps the file: each tensor read maps its pages into the process, and they stay
    mapped (and counted in its resident memory) until the file is closed, so streaming a whole checkpoint through one
    `safe_open` shows the whole file in the peak RSS. Reading each tensor with `readinto` keeps only the tensor itself.
    """

    def __init__(self):
        self.files: dict[Path, tuple] = {}  # path -> (open file, data start, header)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle, _, _ in self.files.values():
            handle.close()
        self.files.clear()

    def read(self, file: Path, key: str) -> torch.Tensor:
        if file not in self.files:
            handle = open(file, "rb")
            (header_len,) = struct.unpack("<Q", handle.read(8))
            self.files[file] = (handle, 8 + header_len, json.loads(handle.read(header_len)))
        handle, data_start, header = self.files[file]
        entry = header[key]
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        handle.seek(data_start + start)
        if handle.readinto(buffer.numpy()) != end - start:
            raise QuantError(f"{file}: tensor {key!r} is truncated")
        return buffer.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                      "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}


def _finish(model: nn.Module, folder) -> nn.Module:
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise QuantError(f"{folder}: {len(still_meta)} tensor(s) never filled, e.g. {still_meta[0]!r}")
    model.eval()
    model.requires_grad_(False)
    return model


def _split_quant_keys(infos: dict) -> tuple[dict, dict[str, dict]]:
    """Stored keys -> (dense tensors, {packed weight key: {suffix: TensorInfo}}) by bitsandbytes' suffixes."""
    quant: dict[str, dict] = {}
    for key, info in infos.items():
        for suffix in QUANT_SUFFIXES:
            if key.endswith(".weight." + suffix):
                quant.setdefault(key[: -len(suffix) - 1], {})[suffix] = info
    dense = {key: info for key, info in infos.items()
             if key not in quant and not any(key.endswith(".weight." + s) for s in QUANT_SUFFIXES)}
    return dense, quant


def _load_prequantized(path, dtype, device, compute_dtype, kernels) -> nn.Module:
    folder = Path(path)
    config = load_config(folder)
    infos = weights.read_headers(folder)
    dense_infos, quant_infos = _split_quant_keys(infos)
    for key in quant_infos:
        if key not in infos:
            raise QuantError(f"{folder}: quant state for {key!r} but no packed weight {key!r}")
    with torch.device("meta"):
        model = Llava(config, kernels)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    # The dense part is checked by the loader's own rules; the layout found there also names the packed weights.
    quantized_names = {}
    for layout in weights.LAYOUTS.values():
        mapped = {layout.to_internal(key): key for key in quant_infos}
        if all(name in expected for name in mapped):
            quantized_names = mapped
            break
    if quant_infos and not quantized_names:
        raise QuantError(f"{folder}: packed 4-bit weights under keys no layout maps, e.g. {sorted(quant_infos)[0]!r}")
    dense_expected = {n: s for n, s in expected.items() if n not in quantized_names}
    layout, entries, ignored = weights.match_keys(dense_infos, dense_expected, weights.LAYOUTS, str(folder))
    checkpoint = weights.Checkpoint(folder, None, config, layout, entries, ignored)

    for name, key in sorted(quantized_names.items()):  # swap in empty 4-bit linears shaped as the file says
        state = _read_quant_state(infos[key].file, key, quant_infos[key])
        owner = name.removesuffix(".weight")
        linear = model.get_submodule(owner)
        if not isinstance(linear, nn.Linear) or tuple(state["shape"]) != tuple(linear.weight.shape):
            raise QuantError(f"{infos[key].file}: {key!r} holds a 4-bit weight of shape {state['shape']}, but "
                             f"{owner!r} is {type(linear).__name__} {tuple(linear.weight.shape)}")
        set_submodule(model, owner, Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                               state["quant_type"], state["blocksize"], "nested_blocksize" in state,
                                               compute_dtype, getattr(torch, state["dtype"]), device="meta"))
    with TensorReader() as reader:
        for name, info in checkpoint.entries.items():
            owner, _, param_name = name.rpartition(".")
            tensor = reader.read(info.file, info.key).to(device=device, dtype=dtype)
            weights.place_tensor_default(model.get_submodule(owner), param_name, tensor)
        for name, key in sorted(quantized_names.items()):  # one 4-bit linear at a time
            packed = reader.read(infos[key].file, key).to(device)
            parts = {suffix: reader.read(info.file, info.key).to(device) for suffix, info in quant_infos[key].items()}
            try:
                model.get_submodule(name.removesuffix(".weight"))._load_packed(packed, parts)
            except (QuantError, ValueError, KeyError, AssertionError) as err:
                raise QuantError(f"{infos[key].file}: {key!r}: {err}") from err
    return _finish(model, folder)


def _read_quant_state(file, key: str, parts: dict) -> dict:
    """The JSON half of a packed QuantState (quant_type, blocksize, dtype, shape, nested_*)."""
    keys = [s for s in parts if s.startswith("quant_state.")]
    if len(keys) != 1:
        raise QuantError(f"{file}: 4-bit weight {key!r} needs exactly one {key}.quant_state.bitsandbytes__<nf4|fp4> "
                         f"tensor, found {keys}")
    info = parts[keys[0]]
    with TensorReader() as reader:
        state = unpack_tensor_to_dict(reader.read(info.file, info.key))
    missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in state]
    if missing:
        raise QuantError(f"{info.file}: {info.key!r} lacks {missing}")
    return state


# ---------------------------------------------------------------------------------------------------------------------
# Saving a quantized model


def save_quantized(model: nn.Module, folder: str | Path, layout: str = "llava-hf") -> Path:
    """config.json (with a bitsandbytes `quantization_config`) + model.safetensors: packed weights and quant state.

    Keys follow `layout` like `ref.weights.save_model`, with bitsandbytes' per-weight suffixes for the 4-bit linears
    (`...q_proj.weight`, `...q_proj.weight.absmax`, ...), the layout transformers uses for bnb-4bit checkpoints.
    """
    if layout not in weights.LAYOUTS or layout == "original":
        raise ValueError(f"layout must be one of {[n for n in weights.LAYOUTS if n != 'original']}, got {layout!r}")
    modules = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not modules:
        raise QuantError("the model has no 4-bit linears: save it with ref.weights.save_model")
    if any(type(m).__name__ == "LoraLinear" for m in model.modules()):
        raise QuantError("the model has LoRA adapters: save them with ref.lora.save_adapter (or merge them first)")
    settings = {(m.quant_type, m.blocksize, m.double_quant) for m in modules.values()}
    if len(settings) != 1:
        raise QuantError(f"mixed 4-bit settings {sorted(settings)} cannot be described by one quantization_config")
    (quant_type, blocksize, double_quant), = settings
    to_external = weights.LAYOUTS[layout].to_external
    tensors = {to_external(name): t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_llava_hf_dict()
    config["quantization_config"] = {  # transformers' BitsAndBytesConfig fields
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_compute_dtype": "float32",  # informative only: our modules compute in the input's dtype
        "blocksize": blocksize,  # not a transformers field; the packed quant state carries it too
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(folder / weights.SINGLE_FILE), metadata={"format": "pt"})
    return folder
