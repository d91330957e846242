"""A reader of our own for GGUF files (llama.cpp's container): metadata, tensor directory, dequantized tensors.

    with read_gguf("model.gguf") as gguf:
        gguf.metadata["llama.block_count"]                  # typed metadata: int, float, bool, str, arrays
        gguf.strings("tokenizer.ggml.tokens")               # an array of strings, checked to be one
        gguf.tensors["blk.0.attn_q.weight"]                 # GGUFTensorInfo: dims (GGUF order), ggml type, offset
        gguf.tensor("blk.0.attn_q.weight")                  # torch float32, PyTorch shape order (dims reversed)

The layout (ggml's docs/gguf.md), all little-endian:

    magic "GGUF" | version u32 (2 or 3) | tensor count u64 | metadata count u64
    metadata:     key (string) | value type u32 | value       string = length u64 + UTF-8 bytes (no NUL)
                  array value = element type u32 | count u64 | elements
    tensor infos: name (string) | n_dims u32 | dims u64 x n_dims (fastest-varying first) | ggml type u32 | offset u64
    padding to `general.alignment` (default 32) | data section: each tensor at data start + its offset

Dequantized types: F32, F16, BF16, Q8_0, Q4_0, Q4_1 (blocks of 32 along the fastest axis). Whole arrays of blocks are
dequantized at once with numpy, with the same float32 operations in the same order as gguf-py's `gguf.dequantize`
(x = d * q, and for Q4_1 (d * q) + m), so the values are bit-equal to it.

The file is memory-mapped and never unpickled; every read is bounds-checked, so a truncated or corrupt file gives a
`GGUFError` naming the file and the key or tensor, never a numpy or struct traceback.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # version 2 is version 3 without big-endian files: the same little-endian layout
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# Arrays of arrays: llama.cpp writes none deeper than 2 (an array of string arrays); 8 is far past any real file, and
# bounds the recursion a hostile file could ask for (5000 levels were a RecursionError).
MAX_ARRAY_DEPTH = 8


class GGUFError(ValueError):
    """A GGUF file that is not one, is truncated or corrupt, or holds something this reader does not read."""


# ---------------------------------------------------------------------------------------------------------------------
# Metadata value types (gguf_type)

UINT32, FLOAT32, STRING, ARRAY, UINT64 = 4, 6, 8, 9, 10
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                  12: "<d"}
SCALAR_DTYPES = {code: np.dtype(fmt) for code, fmt in SCALAR_FORMATS.items()}
VALUE_TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL",
                    8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}


# ---------------------------------------------------------------------------------------------------------------------
# Tensor types (ggml_type) and their dequantization: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32


def _f16(column: np.ndarray) -> np.ndarray:
    """Two bytes per row as a float16 column, widened: (n, 2) uint8 -> (n, 1) float32."""
    return column.view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) values 0..15: the low nibbles are elements 0..15, the high ones 16..31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _plain(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    return lambda blocks: blocks.view(dtype).astype(np.float32)  # astype copies: nothing refers to the mapping


def _bf16(blocks: np.ndarray) -> np.ndarray:
    return (blocks.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)  # bfloat16 is float32's top half


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    """fp16 scale d, 32 int8 q: x = d * q."""
    return _f16(blocks[:, :2]) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    """fp16 scale d, 16 bytes of nibbles: x = d * (q - 8)."""
    return _f16(blocks[:, :2]) * (_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    """fp16 scale d, fp16 minimum m, 16 bytes of nibbles: x = d * q + m (two roundings, as gguf-py: no fused op)."""
    return _f16(blocks[:, :2]) * _nibbles(blocks[:, 4:]).astype(np.float32) + _f16(blocks[:, 2:4])


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_size: int  # elements per block (along the fastest-varying axis)
    type_size: int  # bytes per block
    dequantize: Callable[[np.ndarray], np.ndarray]


GGML_TYPES = {
    0: GGMLType("F32", 1, 4, _plain("<f4")),
    1: GGMLType("F16", 1, 2, _plain("<f2")),
    2: GGMLType("Q4_0", 32, 18, _q4_0),
    3: GGMLType("Q4_1", 32, 20, _q4_1),
    8: GGMLType("Q8_0", 32, 34, _q8_0),
    30: GGMLType("BF16", 1, 2, _bf16),
}
# The rest of ggml's types, by name only: for the message that refuses them.
OTHER_TYPE_NAMES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
                    15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
                    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
                    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


def type_name(code: int) -> str:
    known = GGML_TYPES.get(code)
    return known.name if known else OTHER_TYPE_NAMES.get(code, f"unknown type {code}")


# ---------------------------------------------------------------------------------------------------------------------
# The file


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor directory (no data)."""

    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int | None  # None for a type this reader does not dequantize

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch order (slowest-varying first): the dims reversed."""
        return tuple(reversed(self.dims))


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file; `what` names the item for the error message."""

    def __init__(self, data: np.ndarray, name: str):
        self.data, self.name, self.pos = data, name, 0

    def _need(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.data):
            raise GGUFError(f"{self.name}: truncated: {what} needs {n} bytes at offset {start}, but the file ends at "
                            f"{len(self.data)}")
        self.pos += n
        return start

    def scalar(self, code: int, what: str):
        fmt = SCALAR_FORMATS[code]
        return struct.unpack_from(fmt, self.data, self._need(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar(UINT64, f"the length of {what}")
        start = self._need(n, what)
        try:
            return self.data[start:start + n].tobytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise GGUFError(f"{self.name}: {what} at offset {start} is not valid UTF-8 ({err})") from None

    def value(self, code: int, what: str, depth: int = 0):
        if code in SCALAR_FORMATS:
            value = self.scalar(code, what)
            # A FLOAT32 is the float32 a writer rounded its value to: give back the shortest decimal that rounds to
            # it (1e-05, not 9.99999974737875e-06), the value the writer most likely started from.
            return float(str(np.float32(value))) if code == FLOAT32 else value
        if code == STRING:
            return self.string(what)
        if code == ARRAY:
            return self.array(what, depth + 1)
        raise self._unknown_type(code, what)

    def _unknown_type(self, code: int, what: str) -> GGUFError:
        return GGUFError(f"{self.name}: {what} has value type {code}, which GGUF does not define "
                         f"(known: {', '.join(f'{c} {n}' for c, n in VALUE_TYPE_NAMES.items())})")

    def array(self, what: str, depth: int = 1) -> list | np.ndarray:
        """An array value: numbers as a read-only numpy array of their GGUF type, a view of the mapped file (no memory
        until read, where a Python list of them took 30 bytes per byte of the file: 2.7 GB for a 256 MB array),
        strings and arrays as a list. Its declared length is checked against the bytes left in the file, and arrays
        nest at most MAX_ARRAY_DEPTH deep, before anything is allocated."""
        if depth > MAX_ARRAY_DEPTH:
            raise GGUFError(f"{self.name}: {what} nests arrays more than {MAX_ARRAY_DEPTH} deep; a GGUF's metadata "
                            f"holds arrays of numbers or strings (a corrupt or hostile file)")
        code = self.scalar(UINT32, f"the element type of {what}")
        count = self.scalar(UINT64, f"the length of {what}")
        if code in SCALAR_DTYPES:  # numbers: one numpy read for the whole array
            dtype = SCALAR_DTYPES[code]
            start = self._need(count * dtype.itemsize, what)
            return np.frombuffer(self.data, dtype, count, start)
        if code not in (STRING, ARRAY):
            raise self._unknown_type(code, f"the elements of {what}")
        # A string takes at least its 8-byte length, an array its 4-byte type and 8-byte length: a count past what the
        # file can hold is refused before the loop runs (and allocates) that many times.
        self._check_room(count * (8 if code == STRING else 12), what)
        if code == STRING:
            return self._strings(count, what)
        return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a tight loop (a vocabulary holds 10^5 of them: the general path costs 1 s there)."""
        view, unpack, end, pos = memoryview(self.data), struct.Struct("<Q").unpack_from, len(self.data), self.pos
        strings = []
        for i in range(count):
            n = unpack(view, pos)[0] if pos + 8 <= end else -1
            if n < 0 or pos + 8 + n > end:
                self.pos = pos
                self.string(f"{what}[{i}]")  # raises the truncation error, naming the element
            try:
                strings.append(str(view[pos + 8:pos + 8 + n], "utf-8"))
            except UnicodeDecodeError as err:
                raise GGUFError(f"{self.name}: {what}[{i}] at offset {pos + 8} is not valid UTF-8 ({err})") from None
            pos += 8 + n
        self.pos = pos
        return strings

    def _check_room(self, n: int, what: str) -> None:
        if self.pos + n > len(self.data):
            raise GGUFError(f"{self.name}: truncated: {what} needs at least {n} bytes at offset {self.pos}, but the "
                            f"file ends at {len(self.data)}")


class GGUFFile:
    """A parsed GGUF file: `metadata` {key: value}, `tensors` {name: GGUFTensorInfo}; `tensor(name)` dequantizes."""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = str(self.path) if name is None else name  # what messages call the file
        self._data = _map(self.path, self.name)
        cursor = _Cursor(self._data, self.name)
        self.version, n_tensors, n_kv = self._header(cursor)
        self.metadata = self._metadata(cursor, n_kv)
        self.alignment = self._alignment()
        infos = [self._tensor_info(cursor, i) for i in range(n_tensors)]
        self.data_start = -(-cursor.pos // self.alignment) * self.alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, code, offset in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.name}: tensor {name!r} is listed twice")
            self.tensors[name] = self._checked_tensor(name, dims, code, offset)

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the mapping (it closes when the last array that still views it is gone: numeric metadata arrays view
        it; dequantized tensors never do, they are copies)."""
        self._data = None

    # --- parsing ----------------------------------------------------------------------------------------------------

    def _header(self, cursor: _Cursor) -> tuple[int, int, int]:
        magic = cursor.data[:4].tobytes()
        if magic != MAGIC:
            raise GGUFError(f"{self.name}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
        cursor.pos = 4
        version = cursor.scalar(UINT32, "the version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            why = " (a big-endian file: only little-endian ones are read)" if swapped in SUPPORTED_VERSIONS else ""
            raise GGUFError(f"{self.name}: GGUF version {version} is not supported{why}; this reader reads versions "
                            f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
        return version, cursor.scalar(UINT64, "the tensor count"), cursor.scalar(UINT64, "the metadata count")

    def _metadata(self, cursor: _Cursor, n_kv: int) -> dict:
        metadata: dict = {}
        for i in range(n_kv):
            key = cursor.string(f"metadata key #{i}")
            code = cursor.scalar(UINT32, f"the value type of metadata key {key!r}")
            if key in metadata:
                raise GGUFError(f"{self.name}: metadata key {key!r} appears twice")
            metadata[key] = cursor.value(code, f"metadata key {key!r}")
        return metadata

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 \
                or alignment & (alignment - 1):
            raise GGUFError(f"{self.name}: metadata key 'general.alignment' is {alignment!r}, expected a power of two")
        return alignment

    def _tensor_info(self, cursor: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
        name = cursor.string(f"the name of tensor #{i}")
        n_dims = cursor.scalar(UINT32, f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{self.name}: tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        dims = tuple(cursor.scalar(UINT64, f"the dimensions of tensor {name!r}") for _ in range(n_dims))
        code = cursor.scalar(UINT32, f"the type of tensor {name!r}")
        offset = cursor.scalar(UINT64, f"the data offset of tensor {name!r}")
        return name, dims, code, offset

    def _checked_tensor(self, name: str, dims: tuple[int, ...], code: int, offset: int) -> GGUFTensorInfo:
        """Offset aligned, blocks whole, data inside the file (for the types we read; others are refused on read)."""
        if offset % self.alignment:
            raise GGUFError(f"{self.name}: tensor {name!r} starts at data offset {offset}, not a multiple of the "
                            f"alignment {self.alignment}")
        ggml = GGML_TYPES.get(code)
        if ggml is None:
            return GGUFTensorInfo(name, dims, code, self.data_start + offset, None)
        if dims[0] % ggml.block_size:
            raise GGUFError(f"{self.name}: tensor {name!r} ({ggml.name}) has {dims[0]} elements along its fastest "
                            f"axis, not a multiple of the block size {ggml.block_size}")
        numel = int(np.prod(dims, dtype=object))  # exact: a corrupt dim must not wrap around
        nbytes = numel // ggml.block_size * ggml.type_size
        start, end = self.data_start + offset, self.data_start + offset + nbytes
        if end > len(self._data):
            raise GGUFError(f"{self.name}: tensor {name!r} ({ggml.name}, dims {list(dims)}) needs bytes {start} to "
                            f"{end}, past the end of the file at {len(self._data)} (truncated or corrupt)")
        return GGUFTensorInfo(name, dims, code, start, nbytes)

    # --- reading ----------------------------------------------------------------------------------------------------

    def value(self, key: str, kinds: type | tuple[type, ...], default=...):
        """The metadata value under `key`, checked to be of `kinds` (bool is not an int here); `default` if absent."""
        if key not in self.metadata:
            if default is ...:
                raise GGUFError(f"{self.name}: metadata key {key!r} is missing")
            return default
        value = self.metadata[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            shown = describe(value) if isinstance(value, (list, np.ndarray)) else \
                repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise GGUFError(f"{self.name}: metadata key {key!r} is {shown}, expected "
                            f"{' or '.join(k.__name__ for k in kinds)}")
        return value

    def strings(self, key: str, default=...) -> list[str]:
        """The array of strings under `key` (a vocabulary, merges), refused by key when it holds anything else."""
        value = self._present(key, default)
        if value is not default and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise GGUFError(f"{self.name}: metadata key {key!r} is {describe(value)}, expected an array of strings")
        return value

    def integers(self, key: str, default=...) -> np.ndarray:
        """The array of integers under `key` (token types), refused by key when it holds anything else."""
        value = self._present(key, default)
        if value is not default and not (isinstance(value, np.ndarray) and value.dtype.kind in "iu"):
            raise GGUFError(f"{self.name}: metadata key {key!r} is {describe(value)}, expected an array of integers")
        return value

    def _present(self, key: str, default):
        if key in self.metadata:
            return self.metadata[key]
        if default is ...:
            raise GGUFError(f"{self.name}: metadata key {key!r} is missing")
        return default

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name` as (n_blocks, type_size) uint8, a view of the mapping."""
        info = self._info(name)
        ggml = GGML_TYPES[info.ggml_type]
        n_blocks = info.nbytes // ggml.type_size
        return np.frombuffer(self._data, np.uint8, info.nbytes, info.offset).reshape(n_blocks, ggml.type_size)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` dequantized to float32, in PyTorch shape order (GGUF's dims reversed)."""
        info = self._info(name)
        values = GGML_TYPES[info.ggml_type].dequantize(self.raw(name))  # (n_blocks, block_size)
        return torch.from_numpy(values.reshape(info.shape))

    def _info(self, name: str) -> GGUFTensorInfo:
        if self._data is None:
            raise GGUFError(f"{self.name}: the file is closed")
        if name not in self.tensors:
            raise GGUFError(f"{self.name}: no tensor {name!r} (it has {len(self.tensors)} tensors, e.g. "
                            f"{sorted(self.tensors)[:3]})")
        info = self.tensors[name]
        if info.nbytes is None:
            raise GGUFError(f"{self.name}: tensor {name!r} has ggml type {type_name(info.ggml_type)} "
                            f"({info.ggml_type}), which this reader does not dequantize (it reads "
                            f"{', '.join(t.name for t in GGML_TYPES.values())})")
        return info


def describe(value) -> str:
    """A metadata value's kind, for messages: "an array of 5 INT32", "an array of 2 arrays", "a string"."""
    if isinstance(value, np.ndarray):
        code = next((c for c, dtype in SCALAR_DTYPES.items() if dtype == value.dtype), None)
        return f"an array of {len(value)} {VALUE_TYPE_NAMES.get(code, str(value.dtype))}"
    if isinstance(value, list):
        kinds = sorted({"arrays" if isinstance(item, (list, np.ndarray)) else "strings" for item in value})
        return f"an array of {len(value)} {' and '.join(kinds) or 'items'}"
    return {bool: "a boolean", str: "a string", float: "a number", int: "an integer"}.get(type(value), repr(value))


def _map(path: Path, name: str) -> np.ndarray:
    """The whole file, memory-mapped read-only (numpy keeps the mapping alive while any view of it lives)."""
    if not path.is_file():
        raise GGUFError(f"{name}: no such file")
    if path.stat().st_size < 4 + 4 + 8 + 8:
        raise GGUFError(f"{name}: truncated: {path.stat().st_size} bytes, shorter than a GGUF header (24 bytes)")
    # A plain ndarray view of the memmap: slicing it is cheaper (no memmap subclass per slice); it keeps the map alive.
    return np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)


def read_gguf(path: str | Path, name: str | None = None) -> GGUFFile:
    """Parse the header, metadata and tensor directory of a GGUF file (tensor data is read by `tensor()`). `name`: what
    error messages call the file (default: its path), e.g. the wheel and member it was extracted from."""
    return GGUFFile(path, name)
