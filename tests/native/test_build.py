"""The shared build machinery: the AVX2/FMA decision without torch, the same for both
libraries, and what the compiler actually emitted."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import pytest

from lstm_export.native import build, ort_kernel


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """A fake /proc/cpuinfo on an x86-64, LSTM_EXPORT_KERNEL_PORTABLE unset."""
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.delenv(build.PORTABLE_ENV, raising=False)
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

    from lstm_export.exporters import kernel

    monkeypatch.delenv(build.PORTABLE_ENV, raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    torch_has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert ("-mavx2" in build.simd_flags()) == torch_has_avx2
    assert [f for f in kernel.compile_flags() if f.startswith("-m")] == build.simd_flags()
    assert [f for f in ort_kernel.compile_flags() if f.startswith("-m")] == build.simd_flags()


def _fma_instructions(library) -> int:
    done = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)],
        capture_output=True,
        text=True,
        check=True,
    )
    return sum("vfmadd" in line for line in done.stdout.splitlines())


@pytest.mark.slow  # both builds (cached after the first run)
def test_both_libraries_hold_fma_code_exactly_where_the_cpu_has_it(ort_library):
    """What the compiler emitted, not only what we asked it: the TorchScript kernel and the
    onnxruntime library both carry the AVX2/FMA route here, or neither does."""
    from lstm_export.exporters import kernel

    if shutil.which("objdump") is None:
        if os.environ.get("LSTM_EXPORT_REQUIRE_CPP") == "1":
            pytest.fail("LSTM_EXPORT_REQUIRE_CPP=1 but objdump (binutils) is missing")
        pytest.skip("needs objdump (binutils)")
    expected = "-mfma" in build.simd_flags()
    assert (_fma_instructions(kernel.build_kernel()) > 0) == expected
    assert (_fma_instructions(ort_library) > 0) == expected
