"""Write ``bench/results/gpu.json`` and ``gpu.md`` from what one run of ``scripts/gpu_check.sh`` left in its work
folder, whatever finished: the pytest outcome of every GPU test (JUnit XML, or the verbose log when pytest was
stopped before writing it), the measurements the tests recorded (``measurements/*.json``, see ``tests/test_cuda.py``),
the benchmark results (``bench_gpu.json``, see ``bench/bench_gpu.py``) and the machine (GPU, driver, torch, CUDA,
cuDNN, nccl). Prints a short summary; exits with 1 unless every step exited with 0, no test failed and some passed.

    python bench/gpu_report.py --work DIR [--tests-status "exit 0"] [--bench-status "exit 0"] [--out bench/results]
"""
import argparse
import datetime
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------- gathering
def environment() -> dict:
    """The machine as the tests saw it: GPUs and driver (nvidia-smi), torch, CUDA, cuDNN, nccl, Python."""
    import platform

    info: Dict = {'python': platform.python_version(), 'platform': platform.platform()}
    try:
        query = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total,compute_cap',
                                '--format=csv,noheader'], capture_output=True, text=True, timeout=30)
        info['nvidia_smi'] = [line.strip() for line in query.stdout.splitlines() if line.strip()] or query.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        info['nvidia_smi'] = f'unavailable: {exc}'
    try:
        import torch

        from rave_basicsr.utils.hardware import device_description

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    cuda_available=torch.cuda.is_available(), gpu_count=torch.cuda.device_count())
        if torch.cuda.is_available():
            info['gpus'] = [device_description(torch.device('cuda', index))
                            for index in range(torch.cuda.device_count())]
            try:
                info['nccl'] = '.'.join(map(str, torch.cuda.nccl.version()))
            except Exception as exc:  # informational only
                info['nccl'] = f'unknown ({exc})'
    except Exception as exc:  # the report must be written even when torch itself is broken
        info['torch_error'] = f'{type(exc).__name__}: {exc}'
    return info


def junit_cases(path: Path) -> Optional[List[dict]]:
    """Every test case of a JUnit XML file: name, outcome, seconds and the failure / skip message."""
    if not path.is_file():
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return None
    cases = []
    for case in root.iter('testcase'):
        outcome, message = 'passed', ''
        for child in case:
            if child.tag in ('failure', 'error', 'skipped'):
                outcome = {'failure': 'failed', 'error': 'error', 'skipped': 'skipped'}[child.tag]
                message = (child.get('message') or child.text or '').strip()
                break
        cases.append({'name': case.get('name'), 'outcome': outcome, 'seconds': round(float(case.get('time', 0)), 1),
                      'message': message[:1500]})
    return cases


def log_cases(path: Path) -> List[dict]:
    """Test outcomes from a verbose pytest log (``tests/test_cuda.py::NAME PASSED``): the fallback when pytest was
    stopped before writing its JUnit file."""
    if not path.is_file():
        return []
    cases = {}
    for name, outcome in re.findall(r'::(\S+) (PASSED|FAILED|ERROR|SKIPPED)', path.read_text(errors='replace')):
        cases[name] = {'name': name, 'outcome': outcome.lower(), 'seconds': None, 'message': ''}
    return list(cases.values())


def measurements(folder: Path) -> Dict[str, dict]:
    """``{test name: values}`` from the JSON files the tests wrote."""
    found = {}
    for path in sorted(folder.glob('*.json')) if folder.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
        except ValueError:
            continue
        found[entry['test'].split('::')[-1]] = entry['values']
    return found


def gather(work: Path, tests_status: str, bench_status: str) -> dict:
    cases = junit_cases(work / 'junit.xml')
    source = 'junit'
    if cases is None:
        cases, source = log_cases(work / 'pytest.log'), 'pytest log (no JUnit file: pytest was stopped)'
    counts: Dict[str, int] = {}
    for case in cases:
        counts[case['outcome']] = counts.get(case['outcome'], 0) + 1
    bench = None
    if (work / 'bench_gpu.json').is_file():
        try:
            bench = json.loads((work / 'bench_gpu.json').read_text())
        except ValueError as exc:
            bench = {'error': f'unreadable bench_gpu.json: {exc}'}
    failed = counts.get('failed', 0) + counts.get('error', 0)
    return {'generated': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'ok': failed == 0 and counts.get('passed', 0) > 0 and tests_status == 'exit 0' and bench_status == 'exit 0',
            'environment': environment(),
            'tests': {'status': tests_status, 'source': source, 'counts': counts, 'cases': cases},
            'measurements': measurements(work / 'measurements'),
            'bench': {'status': bench_status, 'results': bench}}


# --------------------------------------------------------------------------------------------------- markdown
def _number(value, digits: int = 3) -> str:
    if value is None:
        return '–'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, float) and 0 < abs(value) < 10 ** -digits * 10:  # small differences: keep their size
        return f'{value:.2e}'
    if isinstance(value, (int, float)):
        return f'{value:.{digits}f}' if isinstance(value, float) else str(value)
    return str(value)


def _table(header: List[str], rows: List[List]) -> List[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(_number(cell) if not isinstance(cell, str) else cell for cell in row) + ' |'
              for row in rows]
    return lines + ['']


def _worst(values) -> Optional[float]:
    if isinstance(values, dict):
        return max(values.values()) if values else None
    return values


def precision_lines(found: Dict[str, dict]) -> List[str]:
    lines = ['## Enhancement on the GPU (`rave enhance`, released `rave_unpaired`, six shared photos)', '']
    fp32 = found.get('test_rave_enhance_fp32_on_cuda_matches_the_cpu_and_the_official_outputs', {})
    true32 = found.get('test_fp32_on_cuda_is_true_float32', {})
    rows = [['fp32', _worst(true32.get('max_grey_diff_vs_cpu')), '0 (reference)',
             _worst(fp32.get('max_8bit_diff_vs_cpu')), _worst(fp32.get('max_8bit_diff_vs_official')),
             f"< {true32.get('bound', '?')} vs CPU"]]
    for precision in ('mixed', 'tf32', 'bf16', 'fp16'):
        values = found.get(f'test_reduced_precisions_on_cuda_against_fp32[{precision}]', {})
        rows.append([precision, values.get('max_grey_diff_vs_cpu_fp32'), values.get('worst'),
                     values.get('max_8bit_diff_vs_fp32_files'), None,
                     f"< {values['bound']}" if 'bound' in values else '–'])
    lines += _table(['precision', 'max diff vs CPU fp32 (grey levels, float)', 'max diff vs GPU fp32 (grey levels)',
                     'max diff of the 8-bit files vs fp32 (CPU for fp32)', 'max diff vs official outputs (8-bit)',
                     'bound'], rows)
    tiled = [[precision, found.get(f'test_tiled_equals_whole_on_cuda[{precision}]', {}).get('worst_grey')]
             for precision in ('fp32', 'tf32', 'mixed')]
    lines += ['Exact tiling (128-px tiles) against the whole image on the GPU, largest difference in grey levels:', '']
    lines += _table(['precision', 'tiled vs whole (grey levels)'], tiled)
    large = [[precision, values.get('max_grey_diff_vs_fp32'), values.get('mean_grey_diff_vs_fp32'),
              f"< {values['bound']}" if 'bound' in values else '–']
             for precision in ('mixed', 'bf16', 'fp16')
             for values in [found.get(f'test_reduced_precisions_on_a_12_megapixel_photo_in_one_pass[{precision}]')]
             if values]
    if large:
        lines += ['A 4000x3000 photo in one pass (`--tile 0`) against fp32 on the GPU, grey levels:', '']
        lines += _table(['precision', 'max', 'mean', 'bound'], large)
    auto = found.get('test_auto_precision_is_mixed_on_a_gpu_with_native_bfloat16')
    if auto:
        lines += [f"`--precision auto` on {auto.get('gpu')}: **{auto.get('resolved')}** (native bfloat16: "
                  f"{_number(auto.get('native_bf16'))}).", '']
    return lines


def tf32_lines(found: Dict[str, dict], bench: dict) -> List[str]:
    """What TF32 changes against true float32: the largest output difference and the speed."""
    values = found.get('test_reduced_precisions_on_cuda_against_fp32[tf32]', {})
    rows = {(row.get('layout'), row.get('precision')): row for row in (bench.get('results') or {}).get('inference', [])}
    parts = []
    if 'worst' in values:
        parts.append(f"on the six photos the output moves by at most {values['worst']:.3f} grey levels "
                     f"({'TF32 engaged' if values.get('engaged') else 'identical: cuDNN did not use TF32'})")
    for layout in ('tiled', 'whole'):
        fp32, tf32 = rows.get((layout, 'fp32'), {}), rows.get((layout, 'tf32'), {})
        if 'seconds' in fp32 and 'seconds' in tf32:
            parts.append(f"{layout} {tf32['image']}: {tf32.get('max_grey_diff_vs_fp32', float('nan')):.3f} grey levels, "
                         f"{fp32['seconds']:.3f} s in fp32 against {tf32['seconds']:.3f} s in tf32 "
                         f"({fp32['seconds'] / tf32['seconds']:.2f}x)")
    return [f"TF32 (`--precision tf32`) against true float32: {'; '.join(parts)}.", ''] if parts else []


def training_lines(found: Dict[str, dict]) -> List[str]:
    lines = ['## Training on the GPU (tiny encoders, 20 iterations, interrupted and resumed)', '']
    rows = []
    for method in ('rave', 'clip_lit_latent'):
        for precision in ('fp32', 'fp16', 'bf16'):
            resumed = found.get(f'test_training_on_cuda_interrupted_and_resumed_reaches_the_end[{method}-{precision}]',
                                {})
            tested = found.get(f'test_basicsr_test_on_the_resumed_checkpoint_on_cuda[{method}-{precision}]', {})
            metrics = tested.get('metrics', {})
            rows.append([method, precision, resumed.get('resumed_in', '–'), resumed.get('last_logged_total_loss'),
                         ', '.join(f'{k} {v:.3f}' for k, v in metrics.items()) or '–',
                         ', '.join(f'{k.split(" ")[-1]} {v:.0f} s' for k, v in resumed.get('seconds', {}).items())
                         or '–'])
    lines += _table(['method', 'precision', 'resumed in', 'last total loss', '`basicsr test` metrics',
                     'seconds per step'], rows)
    rows = []
    for method in ('rave', 'clip_lit_latent'):
        values = found.get(f'test_fp32_resume_on_cuda_matches_an_uninterrupted_run[{method}]', {})
        rows.append([method, values.get('l2_resumed_vs_uninterrupted'), values.get('l2_between_uninterrupted_runs'),
                     values.get('l2_change_after_interruption'), values.get('max_diff_resumed_vs_uninterrupted'),
                     values.get('max_diff_between_uninterrupted_runs'), values.get('max_change_after_interruption'),
                     values.get('bit_identical_resume')])
    lines += ['fp32: resumed against uninterrupted runs (distance over all weights, and largest single-weight '
              'difference):', '']
    lines += _table(['method', 'resumed vs uninterrupted', 'two uninterrupted runs', 'change after the interruption',
                     'max: resumed', 'max: two runs', 'max: change', 'bit-identical'], rows)
    for method in ('rave', 'clip_lit_latent'):
        for ranks in (1, 2):
            values = found.get(f'test_torchrun_on_cuda_uses_nccl[{method}-{ranks}]')
            if values:
                lines.append(f"- torchrun, {method}, {ranks} rank(s): backend {values.get('backend')}, collectives "
                             f"{', '.join(values.get('collectives', []))}.")
    return lines + ['']


def bench_lines(bench: dict) -> List[str]:
    results = bench.get('results')
    lines = [f"## Benchmarks (`bench/bench_gpu.py`, {bench.get('status')})", '']
    if not results or 'meta' not in results:
        return lines + [f'No benchmark results ({(results or {}).get("error", "the step did not write any")}).', '']
    meta = results['meta']
    if meta.get('quick'):
        lines += [f"**Quick smoke-test sizes** (`--quick`) on {meta.get('hardware')}: not GPU figures.", '']
    rows = [[row['layout'], str(row.get('tile')), row['precision'], _number(row.get('seconds'), 3),
             _number(row.get('megapixels_per_s'), 1), _number(row.get('peak_memory_mb'), 0),
             _number(row.get('max_grey_diff_vs_fp32'), 3), row.get('error', '')]
            for row in results.get('inference', [])]
    if rows:
        image = next((row['image'] for row in results['inference'] if 'image' in row), '?')
        lines += [f'A {image} photo from host memory, as `rave enhance` does (median of the timed runs after a '
                  'warm-up):', '']
        lines += _table(['layout', 'tile', 'precision', 'seconds', 'MP/s', 'peak memory (MB)',
                         'max diff vs fp32 (grey levels)', 'note'], rows)
        exact = [row['max_abs_diff_tiled_vs_whole'] for row in results['inference']
                 if 'max_abs_diff_tiled_vs_whole' in row]
        if exact:
            lines += [f'fp32 tiled against whole at this size: largest difference {exact[0]:.2e}.', '']
    training = results.get('training', {})
    if training:
        settings = meta.get('training', {})
        lines += [f"Training iterations/s at batch {settings.get('batch')}, {settings.get('crop')}-px crops, prompt "
                  f"batch {settings.get('prompt_batch')} ({settings.get('timed_iters')} timed iterations after one "
                  'untimed; peak memory in MB):', '']
        rows = []
        for variant, methods in training.items():
            for method, stages in methods.items():
                rows.append([method, variant] + [
                    f"{stages[stage]['iters_per_s']:.2f} ({stages[stage]['peak_memory_mb']:.0f})" if stage in stages
                    else '' for stage in ('prompt_init', 'warmup', 'network', 'prompt', 'guided')]
                    + [stages.get('results_per_image', {}).get('seconds')])
        lines += _table(['method', 'variant', 'A prompt_init', 'B warmup', 'C-1 network', 'C-2 prompt', 'RAVE guided',
                         'results s/image'], rows)
    projection = results.get('projection', {})
    if projection:
        full = meta.get('training', {}).get('schedule', {})
        lines += [f"Projected wall time of the default schedules (options/train_rave.yml: {full.get('rave_warmup')} "
                  f"warm-up + {full.get('rave_guided')} guided iterations; options/train_clip_lit.yml: "
                  f"{full.get('prompt_init')} prompt init + {full.get('warmup')} warm-up, then rounds of "
                  f"{full.get('network')} network + {full.get('prompt')} prompt iterations up to "
                  f"{full.get('clip_lit_total')}, 10 best-model inferences of {full.get('train_images')} images per "
                  'round; per-iteration costs scaled linearly to batch 8 at 512 px where measured smaller):', '']
        lines += _table(['variant', 'RAVE (h)', 'CLIP-LIT (h)', 'CLIP-LIT-Latent (h)', 'CLIP-LIT / RAVE'],
                        [[variant, _number(p['rave_hours'], 1), _number(p['clip_lit_hours'], 1),
                          _number(p['clip_lit_latent_hours'], 1), _number(p['ratio_clip_lit_to_rave'], 2)]
                         for variant, p in projection.items()])
    for skipped in results.get('skipped', []):
        lines.append(f'- skipped: {skipped}')
    for error in results.get('errors', []):
        lines.append(f'- **failed**: {error}')
    return lines + ['']


def markdown(report: dict) -> str:
    env, tests = report['environment'], report['tests']
    counts = ', '.join(f'{count} {outcome}' for outcome, count in sorted(tests['counts'].items())) or 'no tests ran'
    lines = ['# GPU check (`scripts/gpu_check.sh`)', '',
             f"{report['generated']}: **{'all passed' if report['ok'] else 'NOT all passed'}**. "
             f"GPU: {'; '.join(env.get('gpus', [])) or 'none'} (nvidia-smi: {env.get('nvidia_smi')}); "
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, nccl {env.get('nccl')}, "
             f"Python {env.get('python')}.", '',
             f"Tests (`pytest -m cuda tests/test_cuda.py`, {tests['status']}, from the {tests['source']}): {counts}.",
             '']
    lines += _table(['test', 'outcome', 'seconds'], [[case['name'], case['outcome'], _number(case['seconds'], 1)]
                                                     for case in tests['cases']])
    failures = [case for case in tests['cases'] if case['outcome'] in ('failed', 'error')]
    for case in failures:
        lines += [f"- **{case['name']}**: {case['message'][:600]}"]
    if failures:
        lines.append('')
    found = report['measurements']
    lines += precision_lines(found) + tf32_lines(found, report['bench']) + training_lines(found)
    lines += bench_lines(report['bench'])
    return '\n'.join(lines) + '\n'


def summary(report: dict) -> str:
    tests, found = report['tests'], report['measurements']
    lines = [f"gpu check: {'OK' if report['ok'] else 'FAILED'}; tests {tests['status']}: "
             + (', '.join(f'{n} {o}' for o, n in sorted(tests['counts'].items())) or 'none ran')
             + f"; bench {report['bench']['status']}"]
    lines += [f"  FAILED {case['name']}: {case['message'].splitlines()[0][:200] if case['message'] else ''}"
              for case in tests['cases'] if case['outcome'] in ('failed', 'error')]
    for precision in ('mixed', 'tf32', 'bf16', 'fp16'):
        values = found.get(f'test_reduced_precisions_on_cuda_against_fp32[{precision}]')
        if values:
            lines.append(f"  {precision:5s} max {values.get('worst', float('nan')):.3f} grey levels from fp32")
    results = (report['bench'].get('results') or {})
    for row in results.get('inference', []):
        if row.get('layout') == 'tiled' and 'seconds' in row:
            lines.append(f"  {row['image']} {row['precision']:5s} {row['seconds']:.2f} s, "
                         f"peak {row['peak_memory_mb']:.0f} MB")
    lines += [f'  bench FAILED {error[:200]}' for error in results.get('errors', [])]
    for variant, projection in results.get('projection', {}).items():
        lines.append(f"  {variant}: RAVE default schedule {projection['rave_hours']:.1f} h, CLIP-LIT "
                     f"{projection['clip_lit_hours']:.1f} h")
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work', required=True, help='the work folder of scripts/gpu_check.sh')
    parser.add_argument('--tests-status', default='not run')
    parser.add_argument('--bench-status', default='not run')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'), help='folder for gpu.json and gpu.md')
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    report = gather(Path(args.work), args.tests_status, args.bench_status)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'gpu.json').write_text(json.dumps(report, indent=2, default=str) + '\n')
    (out / 'gpu.md').write_text(markdown(report))
    print(summary(report))
    return 0 if report['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
