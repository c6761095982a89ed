"""Enhance real photos with a trained or released enhancement network.

:func:`enhance_image` enhances one image (array or tensor) on any device and precision, tiling large images
exactly (:mod:`rave_basicsr.inference.tiling`), so the result does not depend on the tile size.
:func:`enhance_files` enhances files and folders into an output folder the way users need it: every readable
format and bit depth, alpha carried through, EXIF orientation applied, existing outputs never overwritten without
``overwrite``, atomic writes, and one unreadable file does not stop the others (it is reported in the summary).
"""
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from rave_basicsr.archs.backlit_unet_arch import BacklitUNet, divide_by_illumination
from rave_basicsr.inference.precision import autocast_dtype, prepare_network
from rave_basicsr.inference.tiling import HALO_FULL, tiled_forward
from rave_basicsr.inference.weights import load_enhancement_network
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.image_io import encode_image, is_image_file, read_image, write_image_atomic

#: output formats: name -> file extension ('same' keeps the input's)
OUTPUT_FORMATS = {'png': '.png', 'jpg': '.jpg', 'tiff': '.tiff', 'webp': '.webp', 'bmp': '.bmp'}
#: input extensions written back unchanged by format 'same' (others become PNG)
_WRITABLE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
#: images with more pixels than this are tiled when no tile size is given (bounds peak memory to about 1.5 GB)
AUTO_TILE_PIXELS = 1024 * 1024
AUTO_TILE = 1024 - 2 * HALO_FULL


def select_device(name: str = 'auto') -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; unavailable CUDA is an error."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cpu':
        return torch.device('cpu')
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            raise RaveError(f'--device {name}: CUDA is not available on this machine; use --device cpu or auto.')
        return torch.device(name)
    raise RaveError(f'--device {name!r}: use auto, cpu, cuda or cuda:N.')


def resolve_tile(tile: Optional[int], height: int, width: int) -> int:
    """Tile size for an image: ``None`` picks :data:`AUTO_TILE` for images above :data:`AUTO_TILE_PIXELS`; 0 (or
    a tile covering the image) means one whole-image pass."""
    if tile is None:
        tile = AUTO_TILE if height * width > AUTO_TILE_PIXELS else 0
    if tile < 0:
        raise RaveError(f'--tile {tile}: must be 0 (no tiling) or a positive number of pixels.')
    return 0 if tile == 0 or (tile >= height and tile >= width) else tile


@torch.inference_mode()
def enhance_tensor(network: BacklitUNet, image: torch.Tensor, tile: Optional[int] = None,
                   precision: str = 'fp32', prepared: bool = False) -> torch.Tensor:
    """Enhance an N×3×H×W float tensor in [0, 1] with ``network`` on the network's device; float32 result on the
    image's device. Tiling (``tile`` px, see :func:`resolve_tile`) gives the whole-image result exactly.
    ``prepared``: the network already went through :func:`prepare_network` (then ``precision`` only selects
    autocast), which avoids re-preparing it per image."""
    if prepared:
        device = next(network.parameters()).device
        dtype = None if network.cond1.weight.dtype != torch.float32 else autocast_dtype(precision, device)
    else:
        network, dtype = prepare_network(network, precision)
        device = next(network.parameters()).device
    tile = resolve_tile(tile, image.shape[-2], image.shape[-1])
    if tile:
        return tiled_forward(network, image.float(), tile, device=device, autocast_dtype=dtype)
    source = image.to(device=device, dtype=torch.float32)
    compute = source.to(network.cond1.weight.dtype).contiguous(memory_format=torch.channels_last)
    with contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype):
        light = network.illumination(compute)
    return divide_by_illumination(source, light.float(), network.division_eps).to(image.device)


def enhance_image(network: BacklitUNet, rgb: Union[np.ndarray, torch.Tensor], tile: Optional[int] = None,
                  precision: str = 'fp32', prepared: bool = False) -> Union[np.ndarray, torch.Tensor]:
    """Enhance an H×W×3 float array (RGB in [0, 1]) or an N×3×H×W tensor; returns the same kind, float32."""
    if isinstance(rgb, torch.Tensor):
        return enhance_tensor(network, rgb, tile, precision, prepared)
    array = np.asarray(rgb, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise RaveError(f'enhance_image expects an H×W×3 RGB array, got shape {array.shape}.')
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
    return enhance_tensor(network, tensor, tile, precision, prepared)[0].permute(1, 2, 0).numpy()


@dataclass
class EnhanceSummary:
    """What :func:`enhance_files` did: outputs written (with seconds each), skipped and failed inputs."""
    written: List[Tuple[str, str, float]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def describe(self) -> str:
        """One-paragraph summary for people."""
        lines = [f'{len(self.written)} enhanced, {len(self.skipped)} skipped, {len(self.failed)} failed '
                 f'in {self.seconds:.1f} s'
                 + (f' ({sum(t for *_, t in self.written) / len(self.written):.2f} s per image)' if self.written
                    else '') + '.']
        lines += [f'  skipped {path}: {reason}' for path, reason in self.skipped]
        lines += [f'  FAILED  {path}: {reason}' for path, reason in self.failed]
        return '\n'.join(lines)


def collect_inputs(inputs: Sequence[Union[str, os.PathLike]], recursive: bool = False
                   ) -> Tuple[List[Tuple[Path, Path]], List[Tuple[str, str]]]:
    """``(input file, output path relative to the output folder without extension)`` pairs, and the inputs that
    do not exist. Folders contribute their image files (sub-folders too with ``recursive``, keeping the tree);
    files given by name are taken whatever their extension (an unreadable one then fails by name)."""
    found, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append((path, Path(path.stem)))
        elif path.is_dir():
            candidates = path.rglob('*') if recursive else path.iterdir()
            for file in sorted(p for p in candidates if p.is_file() and is_image_file(p.name)):
                found.append((file, file.relative_to(path).with_suffix('')))
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


def enhance_file(network: BacklitUNet, source: Path, target: Path, tile: Optional[int] = None,
                 precision: str = 'fp32', prepared: bool = False) -> None:
    """Read ``source``, enhance it and write ``target`` atomically with the source's bit depth, alpha and grey-ness
    (as far as the target format allows)."""
    decoded = read_image(str(source))
    enhanced = enhance_image(network, decoded.rgb, tile, precision, prepared)
    if decoded.color_channels == 1 and decoded.alpha is None:
        enhanced = enhanced.mean(axis=2)  # the planes are equal: grey in, grey out
    write_image_atomic(str(target), encode_image(enhanced, target.suffix, decoded.bit_depth, decoded.alpha))


def enhance_files(inputs: Sequence[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike],
                  weights: Union[str, os.PathLike] = 'rave_unpaired', device: str = 'auto', precision: str = 'fp32',
                  tile: Optional[int] = None, recursive: bool = False, overwrite: bool = False,
                  output_format: str = 'same', outer_padding: str = 'reflect', division_eps: float = 0.0,
                  progress: bool = True, echo: Callable[[str], None] = print) -> EnhanceSummary:
    """Enhance files and folders into ``out_dir`` (created if missing) and return what happened.

    Existing outputs are skipped unless ``overwrite``; an unreadable input is recorded in ``failed`` and the rest
    go on. Defaults reproduce the official inference (reflect padding, no epsilon).
    """
    from tqdm import tqdm

    started = time.perf_counter()
    torch_device = select_device(device)
    output_extension(Path('x.png'), output_format)
    network = load_enhancement_network(weights, outer_padding, division_eps, torch_device)
    network, _ = prepare_network(network, precision)
    jobs, missing = collect_inputs(inputs, recursive)
    summary = EnhanceSummary(failed=list(missing))
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
            enhance_file(network, source, target, tile, precision, prepared=True)
        except (RaveError, OSError) as exc:  # unreadable input or unwritable output: report it, go on
            message = str(exc)
            message = message[len(str(source)):].lstrip(': ') if message.startswith(str(source)) else message
            summary.failed.append((str(source), message))
            report(f'failed  {source}: {message}')
            continue
        seconds = time.perf_counter() - begin
        summary.written.append((str(source), str(target), seconds))
        report(f'{seconds:6.2f} s  {source} -> {target}')
    bar.close()
    summary.seconds = time.perf_counter() - started
    return summary
