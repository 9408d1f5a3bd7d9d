"""The shared build machinery: the route decision (AVX-512, AVX2/FMA, portable) without
torch, the same for both libraries, and what the compiler actually emitted."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import pytest

from lstm_export.errors import UsageError
from lstm_export.native import build, ort_kernel


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """A fake /proc/cpuinfo on an x86-64, LSTM_EXPORT_KERNEL_PORTABLE unset."""
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.delenv(build.PORTABLE_ENV, raising=False)
    monkeypatch.delenv(build.ISA_ENV, raising=False)
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(build, "CPUINFO", path)

    def write(*flags: str) -> None:
        processor = "processor\t: {}\nmodel name\t: fake\nflags\t\t: {}\n\n"
        path.write_text(processor.format(0, " ".join(flags)) + processor.format(1, "sse2"))

    return write


def test_avx2_and_fma_both_give_the_flags(cpuinfo):
    cpuinfo("fpu", "sse2", "avx", "avx2", "fma", "bmi2")
    assert build.simd_flags() == ["-mavx2", "-mfma"]
    assert build.cpu_features() >= {"avx2", "fma"}  # the first processor's line


def test_avx512f_gives_the_avx512_route_on_top_of_avx2(cpuinfo):
    cpuinfo("fpu", "sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl")
    assert build.isa() == "avx512"
    assert build.simd_flags() == ["-mavx2", "-mfma", "-mavx512f"]


def test_avx512f_without_avx2_and_fma_is_not_enough(cpuinfo):
    cpuinfo("fpu", "sse2", "avx512f")
    assert build.isa() == "portable" and build.simd_flags() == []


@pytest.mark.parametrize(
    ("cpu", "wanted", "route"),
    [
        (("avx2", "fma", "avx512f"), "avx2", "avx2"),
        (("avx2", "fma", "avx512f"), "AVX2", "avx2"),
        (("avx2", "fma", "avx512f"), "portable", "portable"),
        (("avx2", "fma", "avx512f"), "avx512", "avx512"),
        (("avx2", "fma"), "avx512", "avx2"),  # never wider than the CPU
        (("sse2",), "avx2", "portable"),
    ],
)
def test_the_isa_variable_caps_the_route(cpuinfo, monkeypatch, cpu, wanted, route):
    cpuinfo(*cpu)
    monkeypatch.setenv(build.ISA_ENV, wanted)
    assert build.isa() == route
    assert build.simd_flags() == build.ISA_FLAGS[route]


def test_portable_wins_over_the_isa_variable(cpuinfo, monkeypatch):
    cpuinfo("avx2", "fma", "avx512f")
    monkeypatch.setenv(build.ISA_ENV, "avx512")
    monkeypatch.setenv(build.PORTABLE_ENV, "1")
    assert build.isa() == "portable"


def test_an_unknown_isa_is_one_line_naming_the_choices(cpuinfo, monkeypatch):
    cpuinfo("avx2", "fma")
    monkeypatch.setenv(build.ISA_ENV, "sse9")
    with pytest.raises(UsageError, match="LSTM_EXPORT_KERNEL_ISA='sse9' is not one of portable"):
        build.simd_flags()


@pytest.mark.parametrize(
    "flags", [("avx2",), ("fma", "avx"), ()], ids=["no-fma", "no-avx2", "none"]
)
def test_without_either_the_portable_route(cpuinfo, flags):
    cpuinfo("fpu", "sse2", *flags)
    assert build.simd_flags() == []


def test_portable_env_unreadable_cpuinfo_and_other_machines_take_the_portable_route(
    cpuinfo, monkeypatch, tmp_path
):
    cpuinfo("avx2", "fma")
    monkeypatch.setenv(build.PORTABLE_ENV, "1")
    assert build.simd_flags() == []
    monkeypatch.delenv(build.PORTABLE_ENV)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert build.simd_flags() == []
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(build, "CPUINFO", tmp_path / "absent")  # not Linux: no such file
    assert build.cpu_features() == frozenset() and build.simd_flags() == []


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64", reason="reads /proc/cpuinfo"
)
def test_the_decision_is_torchs_own_on_this_machine(monkeypatch):
    """torch's AVX2 capability needs avx2 and fma, as ours does; both libraries get it."""
    import torch

    from lstm_export.native import torch_kernel as kernel

    monkeypatch.delenv(build.PORTABLE_ENV, raising=False)
    monkeypatch.delenv(build.ISA_ENV, raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    capability = torch.backends.cpu.get_cpu_capability()
    assert ("-mavx2" in build.simd_flags()) == (capability in ("AVX2", "AVX512"))
    if capability == "AVX512":  # torch asks more of the CPU (avx512bw, vl, dq) than we do
        assert build.isa() == "avx512"
    assert [f for f in kernel.compile_flags() if f.startswith("-m")] == build.simd_flags()
    assert [f for f in ort_kernel.compile_flags() if f.startswith("-m")] == build.simd_flags()


def instructions(library, needle: str) -> int:
    """How many of the library's disassembled instructions contain `needle`."""
    done = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)],
        capture_output=True,
        text=True,
        check=True,
    )
    return sum(needle in line for line in done.stdout.splitlines())


def require_objdump() -> None:
    if shutil.which("objdump") is None:
        if os.environ.get("LSTM_EXPORT_REQUIRE_CPP") == "1":
            pytest.fail("LSTM_EXPORT_REQUIRE_CPP=1 but objdump (binutils) is missing")
        pytest.skip("needs objdump (binutils)")


@pytest.mark.slow  # both builds (cached after the first run)
def test_both_libraries_hold_fma_code_exactly_where_the_cpu_has_it(ort_library):
    """What the compiler emitted, not only what we asked it: the TorchScript kernel and the
    onnxruntime library both carry the AVX2/FMA route here, or neither does; and the 16-lane
    (zmm) code exactly where the route is AVX-512."""
    from lstm_export.native import torch_kernel as kernel

    require_objdump()
    fma = "-mfma" in build.simd_flags()
    wide = build.isa() == "avx512"
    for library in (kernel.build_kernel(), ort_library):
        assert (instructions(library, "vfmadd") > 0) == fma
        assert (instructions(library, "zmm") > 0) == wide
