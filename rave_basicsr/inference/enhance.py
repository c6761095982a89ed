"""Enhance photos (files and folders) with a trained or released enhancement network.

:func:`enhance_files` enhances files and folders into an output folder the way users need it: every readable
format and bit depth, alpha carried through, EXIF orientation applied, existing outputs never overwritten without
``overwrite``, atomic writes, and one bad file does not stop the others (it is reported in the summary). An image
that runs out of memory (a GPU shared with other jobs, a huge photo) is retried with smaller tiles, which exact
tiling makes free of any quality loss. The network itself runs in :class:`~rave_basicsr.inference.enhancer.Enhancer`.
"""
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from rave_basicsr.inference.enhancer import Enhancer, resolve_tile
from rave_basicsr.inference.precision import DEFAULT_PRECISION
from rave_basicsr.inference.weights import DEFAULT_WEIGHTS, load_enhancement_network
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.hardware import select_device
from rave_basicsr.utils.image_io import IMAGE_EXTENSIONS, encode_image, is_image_file, read_image, write_image_atomic

#: output formats: name -> file extension ('same' keeps the input's)
OUTPUT_FORMATS = {'png': '.png', 'jpg': '.jpg', 'tiff': '.tiff', 'webp': '.webp', 'bmp': '.bmp'}
#: input extensions written back unchanged by format 'same' (others become PNG)
_WRITABLE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
#: the smallest tile an out-of-memory retry goes down to
MIN_RETRY_TILE = 64


def enhance_image(network: torch.nn.Module, rgb: Union[np.ndarray, torch.Tensor], tile: Optional[int] = None,
                  precision: str = 'fp32') -> Union[np.ndarray, torch.Tensor]:
    """Enhance an H×W×3 float array (RGB in [0, 1]) or an N×3×H×W tensor with ``network``; returns the same kind,
    float32. For many images, build one :class:`Enhancer` instead (it prepares the network once)."""
    enhancer = Enhancer(network, precision)
    if isinstance(rgb, torch.Tensor):
        return enhancer.enhance(rgb, tile)
    return enhancer.enhance_array(rgb, tile)


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: CUDA's ``OutOfMemoryError`` or the CPU allocator's error."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError)
                                                        and "can't allocate memory" in str(exc))


def enhance_with_retry(enhancer: Enhancer, rgb: np.ndarray, tile: Optional[int] = None
                       ) -> Tuple[np.ndarray, Optional[int]]:
    """Enhance ``rgb``; on running out of memory, free the cache and retry with tiles half as large, down to
    :data:`MIN_RETRY_TILE`. Returns the result and the tile size that finally worked (None: no retry needed)."""
    height, width = rgb.shape[:2]
    current = resolve_tile(tile, height, width)
    retried_with = None
    while True:
        try:
            return enhancer.enhance_array(rgb, current), retried_with
        except Exception as exc:  # only allocation failures are retried
            if not is_out_of_memory(exc):
                raise
        if enhancer.device.type == 'cuda':
            torch.cuda.empty_cache()
        current = (current or max(height, width)) // 2
        if current < MIN_RETRY_TILE:
            raise RaveError(f'out of memory on {enhancer.device} even with {MIN_RETRY_TILE}-px tiles; free memory on '
                            'the device (other processes) or use --device cpu.')
        retried_with = current


@dataclass
class EnhanceSummary:
    """What :func:`enhance_files` did: outputs written (with seconds each), skipped and failed inputs, and the
    inputs that needed smaller tiles after running out of memory."""
    written: List[Tuple[str, str, float]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)
    retried: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and bool(self.written or self.skipped)

    def describe(self) -> str:
        """One-paragraph summary for people."""
        lines = [f'{len(self.written)} enhanced, {len(self.skipped)} skipped, {len(self.failed)} failed '
                 f'in {self.seconds:.1f} s'
                 + (f' ({sum(t for *_, t in self.written) / len(self.written):.2f} s per image)' if self.written
                    else '') + '.']
        lines += [f'  note    {path}: {reason}' for path, reason in self.retried]
        lines += [f'  skipped {path}: {reason}' for path, reason in self.skipped]
        lines += [f'  FAILED  {path}: {reason}' for path, reason in self.failed]
        return '\n'.join(lines)


def collect_inputs(inputs: Sequence[Union[str, os.PathLike]], recursive: bool = False
                   ) -> Tuple[List[Tuple[Path, Path]], List[Tuple[str, str]]]:
    """``(input file, output path relative to the output folder without extension)`` pairs, and the inputs that
    give nothing: missing paths and folders without images. Folders contribute their image files (sub-folders too
    with ``recursive``, keeping the tree); files given by name are taken whatever their extension (an unreadable one
    then fails by name)."""
    found, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append((path, Path(path.stem)))
        elif path.is_dir():
            candidates = path.rglob('*') if recursive else path.iterdir()
            images = sorted(p for p in candidates if p.is_file() and is_image_file(p.name))
            found += [(file, file.relative_to(path).with_suffix('')) for file in images]
            if not images:
                missing.append((str(path), f'no images found (files ending in {", ".join(IMAGE_EXTENSIONS)}'
                                           + (')' if recursive else '; --recursive also searches sub-folders)')))
        else:
            missing.append((str(path), 'no such file or folder'))
    return found, missing


def output_extension(source: Path, output_format: str) -> str:
    """The output extension: the input's with ``same`` (PNG for extensions that cannot be written), else the
    chosen format's."""
    if output_format == 'same':
        suffix = source.suffix.lower()
        return suffix if suffix in _WRITABLE_EXTENSIONS else '.png'
    if output_format not in OUTPUT_FORMATS:
        raise RaveError(f'--format {output_format!r}: use same, {", ".join(OUTPUT_FORMATS)}.')
    return OUTPUT_FORMATS[output_format]


def network_block(option_file: Union[str, os.PathLike]) -> dict:
    """The ``network_g`` block of a BasicSR option file (``--network``)."""
    from rave_basicsr.utils.options import load_option_file

    block = load_option_file(os.fspath(option_file)).get('network_g')
    if not isinstance(block, dict) or not block.get('type'):
        raise RaveError(f'--network {os.fspath(option_file)}: the file has no network_g block with a type.')
    return dict(block)


def enhance_file(enhancer: Enhancer, source: Path, target: Path, tile: Optional[int] = None) -> Optional[int]:
    """Read ``source``, enhance it and write ``target`` atomically with the source's bit depth, alpha and grey-ness
    (as far as the target format allows). Returns the tile size an out-of-memory retry used, or None."""
    decoded = read_image(str(source))
    enhanced, retried_with = enhance_with_retry(enhancer, decoded.rgb, tile)
    if decoded.color_channels == 1 and decoded.alpha is None:
        enhanced = enhanced.mean(axis=2)  # the planes are equal: grey in, grey out
    write_image_atomic(str(target), encode_image(enhanced, target.suffix, decoded.bit_depth, decoded.alpha))
    return retried_with


def enhance_files(inputs: Sequence[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike],
                  weights: Union[str, os.PathLike] = DEFAULT_WEIGHTS, device: str = 'auto',
                  precision: str = DEFAULT_PRECISION,
                  tile: Optional[int] = None, recursive: bool = False, overwrite: bool = False,
                  output_format: str = 'same', outer_padding: str = 'reflect', division_eps: float = 0.0,
                  network_file: Optional[Union[str, os.PathLike]] = None, progress: bool = True,
                  echo: Callable[[str], None] = print) -> EnhanceSummary:
    """Enhance files and folders into ``out_dir`` (created if missing) and return what happened.

    Existing outputs are skipped unless ``overwrite``; an unreadable input is recorded in ``failed`` and the rest
    go on. Defaults reproduce the official inference (reflect padding, no epsilon) at the precision the hardware
    runs fastest within one grey level of fp32 (``auto``). ``network_file``: an option file whose ``network_g``
    the weights belong to (another BasicSR arch than BacklitUNet; found by itself for experiment checkpoints).
    """
    from tqdm import tqdm

    started = time.perf_counter()
    torch_device = select_device(device)
    output_extension(Path('x.png'), output_format)
    resolve_tile(tile, 1, 1)
    jobs, missing = collect_inputs(inputs, recursive)
    summary = EnhanceSummary(failed=list(missing))
    if not jobs:  # nothing to enhance: say so before loading (or downloading) any weights
        summary.seconds = time.perf_counter() - started
        return summary
    network = load_enhancement_network(weights, outer_padding, division_eps, torch_device,
                                       network_opt=None if network_file is None else network_block(network_file))
    enhancer = Enhancer(network, precision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    planned = {}
    bar = tqdm(jobs, unit='img', disable=not progress, dynamic_ncols=True, file=sys.stderr)

    def report(text: str) -> None:  # per-image lines go above the progress bar
        if progress:
            tqdm.write(text, file=sys.stderr)
        else:
            echo(text)

    for source, relative in bar:
        target = out_dir / relative.parent / (relative.name + output_extension(source, output_format))
        if target in planned:
            summary.failed.append((str(source), f'its output {target} would also be written for {planned[target]}; '
                                                'rename one of them or enhance them separately'))
            continue
        planned[target] = source
        if target.exists() and not overwrite:
            summary.skipped.append((str(source), f'{target} exists (pass --overwrite to replace it)'))
            continue
        begin = time.perf_counter()
        try:
            retried_with = enhance_file(enhancer, source, target, tile)
        except (RaveError, OSError) as exc:  # unreadable input or unwritable output: report it, go on
            message = str(exc)
            message = message[len(str(source)):].lstrip(': ') if message.startswith(str(source)) else message
            summary.failed.append((str(source), message))
            report(f'failed  {source}: {message}')
            continue
        seconds = time.perf_counter() - begin
        summary.written.append((str(source), str(target), seconds))
        if retried_with is not None:
            note = f'ran out of memory; enhanced in {retried_with}-px tiles instead (exact: the same result)'
            summary.retried.append((str(source), note))
            report(f'note    {source}: {note}')
        report(f'{seconds:6.2f} s  {source} -> {target}')
    bar.close()
    summary.seconds = time.perf_counter() - started
    return summary
