"""What the hardware computes natively: device selection, native bfloat16, TF32, and a description for reports.

Reduced precisions only pay where the hardware has them: on a CPU without bfloat16 instructions (no AVX512_BF16,
no AMX; most AVX2 machines) bfloat16 convolutions are emulated and run several times *slower* than float32, and
``torch.cuda.is_bf16_supported()`` says True on pre-Ampere GPUs, which emulate it too. Everything that picks a
precision asks :func:`native_bf16` instead.
"""
import contextlib
import os
import platform
import re
from typing import Iterator

import torch

from rave_basicsr.utils.errors import RaveError


def select_device(name: str = 'auto') -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` (N a visible GPU); anything
    else, or a GPU that is not there, is a :class:`RaveError` naming the option."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cpu':
        return torch.device('cpu')
    match = re.fullmatch(r'cuda(?::(\d+))?', name)
    if match is None:
        raise RaveError(f'--device {name!r}: use auto, cpu, cuda or cuda:N (N = 0, 1, ... a visible GPU).')
    if not torch.cuda.is_available():
        raise RaveError(f'--device {name}: CUDA is not available on this machine; use --device cpu or auto.')
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise RaveError(f'--device {name}: this machine has {count} visible GPU(s) (cuda:0 to cuda:{count - 1}); '
                        'check CUDA_VISIBLE_DEVICES or pick another one.')
    return torch.device('cuda', index)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 arithmetic in hardware (x86: AVX512_BF16 or AMX; Arm: the BF16 extension)."""
    cpu = getattr(torch, 'cpu', None)
    for probe in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):
        if hasattr(cpu, probe) and getattr(cpu, probe)():
            return True
    return platform.machine().lower() in ('aarch64', 'arm64') and 'bf16' in _cpuinfo_field('flags', 'features').split()


def _cpuinfo_field(*names: str) -> str:
    """The first ``/proc/cpuinfo`` line whose key is one of ``names`` (Linux; '' elsewhere)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as handle:
            for line in handle:
                key, _, value = line.partition(':')
                if key.strip().lower() in names:
                    return value.strip()
    except OSError:
        pass
    return ''


def native_bf16(device: torch.device) -> bool:
    """True when ``device`` computes bfloat16 natively (CUDA: Ampere or newer, emulation does not count)."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == 'cpu':
        return cpu_has_native_bf16()
    return False


def cpu_capability() -> str:
    """The CPU's vector and bfloat16 capability in words, for benchmark reports (figures depend on it)."""
    parts = [torch.backends.cpu.get_cpu_capability()]
    cpu = getattr(torch, 'cpu', None)
    for probe, name in (('_is_avx512_bf16_supported', 'AVX512_BF16'), ('_is_amx_tile_supported', 'AMX'),
                        ('_is_amx_fp16_supported', 'AMX_FP16')):
        if hasattr(cpu, probe) and getattr(cpu, probe)():
            parts.append(name)
    parts.append('native bf16' if cpu_has_native_bf16() else 'no native bf16')
    model = _cpuinfo_field('model name') or platform.processor() or platform.machine()
    return f'{model}, {os.cpu_count()} logical cores, ' + ' + '.join(parts)


def device_description(device: torch.device) -> str:
    """The device in words (GPU name and compute capability, or :func:`cpu_capability`)."""
    if device.type == 'cuda':
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return (f'{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}, '
                f'{"native" if native_bf16(device) else "no native"} bf16)')
    return cpu_capability()


@contextlib.contextmanager
def float32_math(allow_tf32: bool) -> Iterator[None]:
    """Float32 matrix products and convolutions on CUDA in true float32 (``allow_tf32=False``) or TF32.

    cuDNN convolutions default to TF32 on Ampere and newer GPUs, which keeps only 10 mantissa bits: "fp32" would
    silently not be float32. The previous settings are restored on exit.

    PyTorch 2.9 and newer have two matmul settings, the legacy float32 matmul precision and the new
    ``fp32_precision`` flag, and cuBLAS refuses to run (RuntimeError, "mix of the legacy and new APIs") when they
    disagree: both are set together here (``torch.set_float32_matmul_precision`` sets the new flag too).
    """
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, 'fp32_precision') and hasattr(conv, 'fp32_precision'):
        try:
            legacy = torch.get_float32_matmul_precision()
        except RuntimeError:  # the caller left the two settings disagreeing; put back only the new flags
            legacy = None
        saved = matmul.fp32_precision, conv.fp32_precision
        mode = 'tf32' if allow_tf32 else 'ieee'
        torch.set_float32_matmul_precision('high' if allow_tf32 else 'highest')
        matmul.fp32_precision, conv.fp32_precision = mode, mode
        try:
            yield
        finally:
            if legacy is not None:
                torch.set_float32_matmul_precision(legacy)
            matmul.fp32_precision, conv.fp32_precision = saved
    else:  # PyTorch before 2.9
        saved = matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
        try:
            yield
        finally:
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
