"""The benchmarks of the one-shot GPU check (issue #12): a 12-megapixel photo in every precision, and the training
stages of RAVE, CLIP-LIT and CLIP-LIT-Latent at the originals' size with CLIP-sized encoders.

1. ``inference``: a 4000×3000 photo (the shared ``backlit_1`` upscaled; random pixels without the shared data)
   enhanced by the released ``rave_unpaired`` network through :class:`~rave_basicsr.inference.enhancer.Enhancer`
   from host memory, as ``rave enhance`` does: in the default 990-px exact tiles and as one whole image, in fp32,
   tf32, mixed, bf16 and fp16 (tf32 and fp16 on CUDA only). Seconds (median of ``--repeats`` after a warm-up run,
   synchronised), megapixels/s, peak GPU memory (``torch.cuda.max_memory_allocated``, reset per configuration;
   on the CPU the process's peak RSS) and the largest / mean difference from fp32 in grey levels.
2. ``training``: seconds per iteration of every stage of the three methods on the real models
   (``bench_methods.stage_seconds``) at the originals' size, batch 8 of 512×512 crops and prompt batch 16, with
   ViT-B-32 (guidance) and RN101 (identity, fp16 on CUDA as in the originals) random-init open_clip encoders, in
   fp32, bf16 autocast and channels_last (cuDNN autotuning on, as ``basicsr train`` runs); the projected wall time
   of the default schedules of ``options/train_rave.yml`` and ``options/train_clip_lit.yml``
   (``bench_methods.project``). Every method in fp32 first, then RAVE's variants, then CLIP-LIT's.

Device-agnostic; ``--device cpu --quick`` runs every code path in seconds (a 0.08-megapixel photo, 32-px crops,
tiny encoders). The JSON (``--out``) is rewritten after every measurement, so a run stopped by its time limit keeps
what it measured; a measurement that would not fit into ``--budget`` seconds is skipped and listed as skipped, one
that fails is recorded with its error (exit code 1) and the others still run.
``bench/gpu_report.py`` turns it into ``bench/results/gpu.json`` and ``gpu.md``.

    python bench/bench_gpu.py [--device cuda] [--quick] [--budget 170] [--out /tmp/rave_bench_gpu.json]
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]
import rave_basicsr  # noqa: E402,F401  (registration before any basicsr import)
from rave_basicsr.inference.enhancer import Enhancer, resolve_tile  # noqa: E402
from rave_basicsr.utils.hardware import device_description, native_bf16, select_device  # noqa: E402

import bench_inference  # noqa: E402
import bench_methods  # noqa: E402
from tests.clip_lit_helpers import TINY_VIT  # noqa: E402
from tests.rave_helpers import STATS_GUIDANCE, TINY_IDENTITY, demo_data  # noqa: E402

GREY = 1 / 255
PRECISIONS = {'cuda': ('fp32', 'tf32', 'mixed', 'bf16', 'fp16'), 'cpu': ('fp32', 'mixed', 'bf16')}
TRAIN_VARIANTS = {'fp32': {}, 'bf16': {'mixed_precision': 'bf16'}, 'channels_last': {'channels_last': True}}
STAGES = {'rave': ('warmup', 'guided'), 'clip_lit': ('prompt_init', 'warmup', 'network', 'prompt'),
          'clip_lit_latent': ('prompt_init', 'warmup', 'network', 'prompt')}
#: the order of the training measurements, most wanted first (a tight budget skips the last): RAVE in fp32 and
#: channels-last (the shipped RAVE options; 1.8-1.9x faster on an H200), CLIP-LIT's two methods likewise, then bf16
#: (no faster on an H200: the network's narrow convolutions are bound by memory traffic)
TRAINING_ORDER = [('rave', 'fp32'), ('rave', 'channels_last'), ('clip_lit', 'fp32'), ('clip_lit_latent', 'fp32'),
                  ('clip_lit', 'channels_last'), ('clip_lit_latent', 'channels_last'), ('rave', 'bf16'),
                  ('clip_lit', 'bf16'), ('clip_lit_latent', 'bf16')]


class Results:
    """The measurements so far, written to ``path`` after every change, and the time left of the budget."""

    def __init__(self, path: Path, budget: float, meta: dict) -> None:
        self.path, self.deadline = path, time.monotonic() + budget
        self.data = {'meta': meta, 'inference': [], 'training': {}, 'projection': {}, 'skipped': [], 'errors': []}
        self.save()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, seconds: float, what: str) -> bool:
        """Whether ``seconds`` more fit into the budget; if not, ``what`` is recorded as skipped."""
        if seconds <= self.left():
            return True
        self.data['skipped'].append(f'{what} (needs about {seconds:.0f} s, {max(self.left(), 0):.0f} s left)')
        print(f'skipped: {self.data["skipped"][-1]}', flush=True)
        self.save()
        return False

    def error(self, what: str, exc: Exception, into, entry: Optional[dict] = None, key: Optional[str] = None) -> None:
        """Record a measurement that failed (appended to a list, or stored under ``key`` of a dict)."""
        message = f'{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ""}'[:500]
        row = dict(entry or {}, error=message)
        if key is None:
            into.append(row)
        else:
            into[key] = row
        self.data['errors'].append(f'{what}: {message}')
        print(f'FAILED {what}: {message}', flush=True)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f'.{self.path.name}.tmp')
        temporary.write_text(json.dumps(self.data, indent=2) + '\n')
        os.replace(temporary, self.path)


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset; on the CPU the process's peak RSS (never reset)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- inference
def measure_enhancer(enhancer: Enhancer, image: torch.Tensor, tile: int, repeats: int) -> tuple:
    """(output, seconds of each timed run, peak memory MB): one warm-up run, then ``repeats`` timed ones."""
    device = enhancer.device
    enhancer.enhance(image, tile)
    reset_peak_memory(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        output = enhancer.enhance(image, tile)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return output, times, peak_memory_mb(device)


def bench_photo(results: Results, device: torch.device, width: int, height: int, repeats: int,
                tile: Optional[int] = None) -> None:
    """Part 1: the photo in every precision, tiled (``tile``; default: as ``rave enhance`` does) and whole."""
    image = torch.from_numpy(bench_inference.backlit_photo(height, width).astype(np.float32))
    image = image.permute(2, 0, 1)[None].contiguous()  # host memory, as rave enhance holds photos
    network = bench_inference.released_network().to(device)
    megapixels = width * height / 1e6
    fp32 = {}
    last_seconds = 5.0
    for layout, tile in (('tiled', resolve_tile(tile, height, width)), ('whole', 0)):
        for precision in PRECISIONS[device.type]:
            what = f'inference {layout} {precision}'
            if not results.fits(last_seconds * (repeats + 1) + 5, what):
                continue
            started = time.perf_counter()
            try:
                output, times, peak = measure_enhancer(Enhancer(network, precision), image, tile, repeats)
            except Exception as exc:  # recorded; the other configurations still run
                free_memory(device)
                results.error(what, exc, results.data['inference'],
                              {'layout': layout, 'tile': tile, 'precision': precision})
                continue
            last_seconds = (time.perf_counter() - started) / (repeats + 1)
            row = {'layout': layout, 'tile': tile, 'precision': precision, 'image': f'{width}x{height}',
                   'seconds': statistics.median(times), 'seconds_all': times,
                   'megapixels_per_s': megapixels / statistics.median(times), 'peak_memory_mb': peak,
                   'memory_kind': 'cuda_max_allocated' if device.type == 'cuda' else 'process_peak_rss'}
            if precision == 'fp32':
                fp32[layout] = output
                if layout == 'whole' and 'tiled' in fp32:
                    row['max_abs_diff_tiled_vs_whole'] = float((fp32['tiled'] - output).abs().max())
            if precision != 'fp32' and layout in fp32:
                difference = (output - fp32[layout]).abs()
                row['max_grey_diff_vs_fp32'] = float(difference.max()) / GREY
                row['mean_grey_diff_vs_fp32'] = float(difference.mean()) / GREY
            results.data['inference'].append(row)
            results.save()
            print(f"{what}: {row['seconds']:.3f} s, {row['megapixels_per_s']:.1f} MP/s, peak {peak:.0f} MB, "
                  f"max diff vs fp32 {row.get('max_grey_diff_vs_fp32', 0):.3f} grey levels", flush=True)
            del output
            free_memory(device)


# -------------------------------------------------------------------------------------------------- training
def encoders_for(device: torch.device, quick: bool) -> tuple:
    """(latent / RAVE guidance, prompt guidance, identity) encoder blocks: CLIP-sized random open_clip models (RN101
    in fp16 on CUDA, as the originals), or the tiny test encoders with ``quick``."""
    if quick:
        return STATS_GUIDANCE, TINY_VIT, TINY_IDENTITY
    vit = {'type': 'open_clip', 'model': 'ViT-B-32', 'pretrained': None, 'precision': 'fp32'}
    rn101 = {'type': 'open_clip', 'model': 'RN101', 'pretrained': None,
             'precision': 'fp16' if device.type == 'cuda' else 'fp32'}
    return vit, vit, rn101


def build(method: str, data: dict, root: Path, encoders: tuple, sizes: argparse.Namespace, device: torch.device,
          train_extra: dict):
    if method == 'rave':
        return bench_methods.rave_model(data, root, encoders, sizes, device.type, train_extra)
    guidance = 'prompt' if method == 'clip_lit' else 'latent'
    return bench_methods.clip_lit_model(data, root, guidance, encoders, sizes, device.type, train_extra)


def measure_stages(model, method: str, batch: dict, iters: int, device: torch.device) -> dict:
    """Seconds per iteration and peak memory of each stage of ``method`` (and, for CLIP-LIT, seconds per image of
    the results inference that feeds its ranking loss)."""
    row = {}
    for stage in STAGES[method]:
        reset_peak_memory(device)
        seconds = bench_methods.stage_seconds(model, stage, batch, iters)
        row[stage] = {'seconds_per_iter': seconds, 'iters_per_s': 1 / seconds, 'peak_memory_mb': peak_memory_mb(device)}
    if method != 'rave':
        images = len(model.pair_data.backlit)

        def record(index: int) -> None:
            model.record_results(0, index)
            synchronize(device)
        row['results_per_image'] = {'seconds': bench_methods.timed(record, 1) / images}
    return row


def bench_training(results: Results, device: torch.device, quick: bool, iters: int) -> None:
    """Part 2: the stages of every method in every variant, then the projected default schedules."""
    schedule = bench_methods.default_schedule()
    sizes = argparse.Namespace(crop=32 if quick else schedule['crop'], batch=2 if quick else schedule['batch'],
                               prompt_batch=2 if quick else schedule['prompt_batch'], best_events=10,
                               rave_guided=schedule['rave_guided'])
    encoders = encoders_for(device, quick)
    results.data['meta']['training'] = {'crop': sizes.crop, 'batch': sizes.batch, 'prompt_batch': sizes.prompt_batch,
                                        'timed_iters': iters, 'encoders': encoders, 'schedule': schedule}
    root = Path(tempfile.mkdtemp(prefix='rave_bench_gpu_'))
    counts = bench_methods.training_image_counts(sizes.prompt_batch)
    data = demo_data(root / 'data', size=max(sizes.crop, 48), n_val=1, **counts)
    batch = {'lq': torch.rand(sizes.batch, 3, sizes.crop, sizes.crop, generator=torch.Generator().manual_seed(0))}
    last_seconds = 10.0 if quick else 30.0
    torch.backends.cudnn.benchmark = True  # as BasicSR's training pipeline sets it
    for method, variant in TRAINING_ORDER:
        extra = TRAIN_VARIANTS[variant]
        what = f'training {method} {variant}'
        if variant == 'bf16' and device.type == 'cuda' and not native_bf16(device):
            results.data['skipped'].append(f'{what} (this GPU has no native bfloat16)')
            continue
        if not results.fits(last_seconds, what):
            continue
        started = time.perf_counter()
        try:
            model = build(method, data, root, encoders, sizes, device, extra)
            row = measure_stages(model, method, batch, iters, device)
        except Exception as exc:  # recorded; the other methods and variants still run
            results.error(what, exc, results.data['training'].setdefault(variant, {}), key=method)
            continue
        finally:
            model = None
            free_memory(device)
        last_seconds = time.perf_counter() - started
        row['seconds_total'] = last_seconds
        results.data['training'].setdefault(variant, {})[method] = row
        results.save()
        rates = [f'{stage} {row[stage]["iters_per_s"]:.2f} it/s' for stage in STAGES[method]]
        print(f'{what}: {", ".join(rates)}', flush=True)
    for variant, rows in results.data['training'].items():
        if set(rows) != set(STAGES) or any('error' in row for row in rows.values()):
            continue
        seconds = {method: {stage: values['seconds_per_iter'] if 'seconds_per_iter' in values else values['seconds']
                            for stage, values in row.items() if isinstance(values, dict)}
                   for method, row in rows.items()}
        results.data['projection'][variant] = bench_methods.project(seconds, sizes, scaled=True, schedule=schedule)
    results.save()


def meta(device: torch.device, quick: bool) -> dict:
    info = {'device': str(device), 'hardware': device_description(device), 'quick': quick,
            'torch': torch.__version__, 'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(),
            'python': platform.python_version(), 'platform': platform.platform(), 'threads': torch.get_num_threads()}
    if device.type == 'cuda':
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_gb=properties.total_memory / 2 ** 30, gpu_count=torch.cuda.device_count())
    return info


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', help='cuda, cuda:N or cpu')
    parser.add_argument('--quick', action='store_true', help='tiny sizes and encoders: a smoke test of every path')
    parser.add_argument('--budget', type=float, default=170, help='seconds; later measurements are skipped')
    parser.add_argument('--photo', default=None, help='W×H of the photo (default 4000x3000, --quick 320x240)')
    parser.add_argument('--tile', type=int, default=None,
                        help='tile of the tiled runs (default: rave enhance\'s, 990 px above 1 megapixel; --quick 128)')
    parser.add_argument('--repeats', type=int, default=None, help='timed runs per photo configuration (default 2)')
    parser.add_argument('--iters', type=int, default=None, help='timed iterations per training stage (default 5)')
    parser.add_argument('--parts', default='inference,training', help='comma-separated parts to run')
    parser.add_argument('--out', default=os.path.join(tempfile.gettempdir(), 'rave_bench_gpu.json'),
                        help='the JSON file to write (gpu_check.sh keeps it with its logs)')
    args = parser.parse_args(argv)
    device = select_device(args.device)
    width, height = (int(value) for value in (args.photo or ('320x240' if args.quick else '4000x3000')).split('x'))
    results = Results(Path(args.out), args.budget, meta(device, args.quick))
    print(f'bench_gpu on {results.data["meta"]["hardware"]} (torch {torch.__version__}), budget {args.budget:.0f} s',
          flush=True)
    parts: Dict[str, Callable[[], None]] = {
        'inference': lambda: bench_photo(results, device, width, height, args.repeats or (1 if args.quick else 2),
                                         args.tile or (128 if args.quick else None)),
        'training': lambda: bench_training(results, device, args.quick, args.iters or (1 if args.quick else 5)),
    }
    for name in args.parts.split(','):
        parts[name]()
    results.data['meta']['seconds'] = args.budget - results.left()
    results.save()
    print(f'bench_gpu: done in {results.data["meta"]["seconds"]:.0f} s; {len(results.data["skipped"])} skipped, '
          f'{len(results.data["errors"])} failed; results in {args.out}', flush=True)
    return 1 if results.data['errors'] else 0


if __name__ == '__main__':
    sys.exit(main())
