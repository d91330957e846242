"""harness.devices.cpu_has_native_bf16: native bfloat16 matmuls read from /proc/cpuinfo's flags, on excerpts of the
texts real machines print (x86 `flags`, ARM `Features`)."""

from __future__ import annotations

import sys

import pytest

from harness import devices
from harness.devices import cpu_has_native_bf16, cpuinfo_has_bf16, default_dtype, default_train_dtype

X86_HEAD = "processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\n"
X86_BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2"
AVX512 = "avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"
# Sapphire Rapids lists avx512_bf16 as well; left out here, so that amx_bf16 alone is what answers
SAPPHIRE_RAPIDS = f"{X86_BASE} {AVX512} avx512_fp16 amx_bf16 amx_tile amx_int8"
COOPER_LAKE = f"{X86_BASE} {AVX512} avx512_bf16"
ICE_LAKE = f"{X86_BASE} {AVX512} avx512vbmi avx512_vbmi2"  # AVX512 without bfloat16
ARM_HEAD = "processor\t: {n}\nBogoMIPS\t: 2100.00\n"
GRAVITON3 = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
             "sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 "
             "i8mm bf16 dgh rng")
GRAVITON2 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"


def x86(*flag_lines: str) -> str:
    return "\n".join(X86_HEAD.format(n=n, model="Xeon") + f"flags\t\t: {flags}\n" for n, flags in enumerate(flag_lines))


def arm(*feature_lines: str) -> str:
    return "\n".join(ARM_HEAD.format(n=n) + f"Features\t: {features}\nCPU implementer\t: 0x41\n"
                     for n, features in enumerate(feature_lines))


@pytest.mark.parametrize("text,native", [
    (x86(COOPER_LAKE, COOPER_LAKE), True),  # AVX512-BF16
    (x86(SAPPHIRE_RAPIDS), True),  # AMX-BF16
    (x86(ICE_LAKE, ICE_LAKE), False),  # AVX512 is not enough
    (x86(COOPER_LAKE, ICE_LAKE), False),  # every processor must have it: the threads run on all of them
    (arm(GRAVITON3, GRAVITON3), True),
    (arm(GRAVITON2), False),
    (arm(GRAVITON2 + " svebf16"), False),  # SVE's bfloat16 extension alone is not the bf16 flag: whole words only
    ("processor\t: 0\nmodel name\t: some CPU\n", False),  # no flags line at all
    ("", False),
], ids=["cooper-lake", "sapphire-rapids", "ice-lake", "mixed", "graviton3", "graviton2", "svebf16-only",
        "no-flags", "empty"])
def test_cpuinfo_flags_say_whether_bfloat16_is_native(text, native):
    assert cpuinfo_has_bf16(text) is native


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/cpuinfo is Linux's")
def test_the_detector_reads_the_file_it_is_given_and_says_false_without_one(tmp_path):
    (tmp_path / "bf16").write_text(arm(GRAVITON3))
    (tmp_path / "none").write_text(x86(ICE_LAKE))
    assert cpu_has_native_bf16(tmp_path / "bf16") is True
    assert cpu_has_native_bf16(tmp_path / "none") is False
    assert cpu_has_native_bf16(tmp_path / "missing") is False
    assert isinstance(cpu_has_native_bf16(), bool)  # this machine's own answer, whatever it is


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-bf16"])
def test_train_py_takes_bfloat16_where_the_cpu_has_it_and_eval_py_keeps_float32_on_every_cpu(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)  # both kinds of CPU, whatever this one is
    assert default_train_dtype("cpu") == ("bfloat16" if native else "float32")
    assert default_train_dtype("cuda") == default_dtype("cuda") == "bfloat16"
    assert default_dtype("cpu") == "float32"
