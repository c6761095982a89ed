"""Compare enhancement networks on a test set (``rave compare``, docs/compare.md).

One call enhances a folder of test images with every network given (released names, ``.pth`` files, BasicSR
checkpoints or experiment folders), reusing outputs that are already there, then scores every output with the
metrics that ``basicsr test`` uses (the same registered functions, called the same way on the same uint8 images),
and writes a report (:mod:`rave_basicsr.inference.compare_report`).

* :func:`~rave_basicsr.inference.compare_plan.plan_comparison` checks every argument (images, ground truth, weights,
  labels, metrics, encoder and residual, earlier outputs) before anything is loaded or downloaded; problems raise
  :class:`RaveError`.
* :func:`compare_models` runs a plan: enhancement through :func:`rave_basicsr.inference.enhance.enhance_files`, then
  one pass over the images that computes the metrics, previews and grid thumbnails. A bad image, a missing or
  unusable ground truth or a metric that fails on one image is recorded in :attr:`CompareResult.problems` and the
  rest goes on.

Layout of the output folder::

    OUTDIR/<label>/<image>.png      outputs of each network (never overwritten without ``overwrite``)
    OUTDIR/<label>/weights.json     which weights and precision made them (a mismatch is refused)
    OUTDIR/previews/...             reduced JPEG copies for the HTML page
    OUTDIR/results.csv, per_image.csv, results.md, grid.png, index.html
"""
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from rave_basicsr.inference.compare_plan import (DEFAULT_METRICS, MANIFEST, METRICS, NIQE_BLOCK, ComparePlan,
                                                 CompareResult, PathLike, output_path, plan_comparison,
                                                 weights_record)
from rave_basicsr.inference.weights import check_state_dict_matches, load_enhancement_state_dict, resolve_weights
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.image_io import read_image, write_image_atomic

class GuidanceScorer:
    """The guidance score of an image: :func:`calculate_guidance_score` with a residual file's direction and its
    encoder (or the ``--encoder`` given), as ``RAVEModel`` computes it in ``basicsr test``."""

    def __init__(self, residual: PathLike, encoder: Optional[str] = None, device: Optional[torch.device] = None):
        from rave_basicsr.residual.encoder_spec import build_encoder_for_residual
        from rave_basicsr.residual.vector import ResidualVector

        vector = ResidualVector.load(residual)
        self.encoder = build_encoder_for_residual(encoder, vector.encoder_identity)
        vector.check_encoder(self.encoder)
        self.device = device or torch.device('cpu')
        self.encoder.to(self.device)
        self.direction = vector.residual.float().to(self.device)

    def __call__(self, rgb: np.ndarray) -> float:
        from basicsr.utils.registry import METRIC_REGISTRY

        from rave_basicsr.data.transforms import to_tensor

        images = to_tensor(rgb)[None].to(self.device)
        return float(METRIC_REGISTRY.get('calculate_guidance_score')(images, self.encoder, self.direction))


def metric_image(rgb: np.ndarray) -> np.ndarray:
    """An H×W×3 float RGB image as BasicSR's metrics take it: uint8 BGR, converted by BasicSR's own
    ``tensor2img`` (clamp, ``round(x * 255)``), as ``basicsr test`` converts its outputs and ground truths."""
    from basicsr.utils import tensor2img

    from rave_basicsr.data.transforms import to_tensor

    return tensor2img([to_tensor(rgb)])


def niqe_block_count(height: int, width: int) -> int:
    """The number of whole 96×96 blocks NIQE fits its model to (it needs at least 2)."""
    return (height // NIQE_BLOCK) * (width // NIQE_BLOCK)


def usable_metrics(names: Sequence[str], have_ground_truth: bool, have_guidance: bool) -> Tuple[List[str], List[str]]:
    """(the metrics that will run, notes on the others): full-reference metrics need ``--gt``, LPIPS the optional
    ``lpips`` package, the guidance score a residual."""
    from rave_basicsr.metrics.rave_protocol_metric import lpips_unavailable_reason

    usable, notes = [], []
    for name in names:
        spec = METRICS[name]
        if spec.reference and not have_ground_truth:
            notes.append(f'{name} skipped: it needs ground truth (--gt GT_DIR).')
            continue
        if name == 'lpips':
            reason = lpips_unavailable_reason()
            if reason:
                notes.append(f'lpips skipped: {reason}')
                continue
        if name == 'guidance' and not have_guidance:
            notes.append('guidance skipped: give --residual FILE (and --encoder SPEC when the residual file does not '
                         'name a rebuildable encoder) to score the outputs along the residual direction.')
            continue
        usable.append(name)
    return usable, notes


# ---------------------------------------------------------------------------------------------------- running
def _strip_path(message: str, path: Union[str, Path]) -> str:
    """A message without a leading ``PATH:`` (problems are listed by image already)."""
    text = str(path)
    return message[len(text):].lstrip(': ') if message.startswith(text) else message


def prepare_weights(plan: ComparePlan) -> Dict[str, Path]:
    """The local weights file of every model that still has outputs to make (released names fetched now), each
    checked against the network's shape, before any image is enhanced; :class:`RaveError` otherwise."""
    from rave_basicsr.archs.backlit_unet_arch import BacklitUNet

    files, reference = {}, None
    for model in plan.models:
        if model.is_input:
            continue
        missing = plan.overwrite or any(not output_path(plan.out_dir, model.label, image).is_file()
                                        for image in plan.inputs)
        if not missing:
            continue
        path = model.path if model.path is not None else resolve_weights(model.name)
        reference = reference or BacklitUNet()
        check_state_dict_matches(reference, load_enhancement_state_dict(path), f'--weights {model.spec}')
        files[model.label] = Path(path)
    return files


def _enhance_all(plan: ComparePlan, result: CompareResult, files: Dict[str, Path], device: str,
                 tile: Optional[int], progress: bool, echo: Callable[[str], None]) -> None:
    from rave_basicsr.inference.enhance import enhance_files

    models = [model for model in plan.models if not model.is_input]
    for index, model in enumerate(models, 1):
        folder = plan.out_dir / model.label
        if model.label not in files:
            result.reused[model.label] = len(plan.inputs)
            echo(f'[{index}/{len(models)}] {model.label}: all {len(plan.inputs)} outputs exist in {folder}, reused.')
            if not (folder / MANIFEST).is_file():
                result.notes.append(f'{folder}: outputs reused without a record of the weights that made them '
                                    f'({MANIFEST} is missing); pass --overwrite if they may be stale.')
            continue
        echo(f'[{index}/{len(models)}] {model.label}: enhancing {len(plan.inputs)} images with '
             f'{model.describe()} into {folder}')
        folder.mkdir(parents=True, exist_ok=True)
        record = json.dumps(weights_record(model, plan.precision), indent=2) + '\n'
        write_image_atomic(str(folder / MANIFEST), record.encode())  # before the outputs: partial runs stay attributed
        summary = enhance_files([str(path) for path in plan.inputs.values()], folder, weights=str(files[model.label]),
                                device=device, precision=plan.precision, tile=tile, overwrite=plan.overwrite,
                                output_format='png', progress=progress, echo=echo)
        result.enhanced[model.label] = len(summary.written)
        result.reused[model.label] = len(summary.skipped)
        for source, reason in summary.failed:
            result.add_problem(Path(source).name, _strip_path(reason, source), model.label)


def _silent(text: str) -> None:
    """The ``echo`` of a quiet run: per-model and per-image lines are dropped (problems are in the result)."""


def _read_rgb(path: Path) -> np.ndarray:
    return read_image(str(path)).rgb


class _Evaluator:
    """The pass over the images after enhancement: reads each input, ground truth and output once, computes the
    metrics, writes the previews and keeps the grid thumbnails (never full-size images)."""

    def __init__(self, plan: ComparePlan, result: CompareResult, scorer: Optional[GuidanceScorer], thumb_size: int,
                 preview_size: int) -> None:
        self.plan, self.result, self.scorer = plan, result, scorer
        self.thumb_size, self.preview_size = thumb_size, preview_size
        self.niqe_noted = False

    def preview(self, rgb: np.ndarray, folder: str, image: str) -> None:
        _preview(rgb, self.plan.out_dir / 'previews' / folder / f'{image}.jpg', self.preview_size)

    def cell(self, rgb: Optional[np.ndarray], caption: Sequence[str]):
        from rave_basicsr.inference.compare_report import GridCell

        return GridCell(rgb, self.thumb_size, caption)

    def image(self, image: str, source: Path, row: Optional[dict]) -> None:
        """Evaluate every model's output of one input (``row``: its grid cells, or None when not in the grid)."""
        row = {} if row is None else row
        try:
            rgb_in = _read_rgb(source)
        except RaveError as exc:
            self.result.add_problem(source.name, _strip_path(str(exc), source))
            row['input'] = self.cell(None, [source.name, 'unreadable'])
            return
        self.preview(rgb_in, 'input', image)
        row['input'] = self.cell(rgb_in, [source.name])
        gt_img = self.ground_truth(image, source, rgb_in, row) if self.plan.gt_dir is not None else None
        for model in self.plan.models:
            target = source if model.is_input else output_path(self.plan.out_dir, model.label, image)
            rgb = rgb_in if model.is_input else self.output(source, target, rgb_in, model.label)
            if rgb is None:
                row[model.label] = self.cell(None, ['no output'])
                continue
            scores = self.scores(source, rgb, gt_img, model.label)
            self.result.values.setdefault(model.label, {})[image] = scores
            if model.is_input:
                row['input'].caption += _caption(scores)[:1]
            else:
                self.preview(rgb, model.label, image)
                row[model.label] = self.cell(rgb, _caption(scores))

    def output(self, source: Path, target: Path, rgb_in: np.ndarray, label: str) -> Optional[np.ndarray]:
        """A model's output of ``source``, or None (with a problem recorded unless enhancement reported one)."""
        problem = None
        if not target.is_file():
            if not any(p.image == source.name and label in p.models for p in self.result.problems):
                problem = f'no output {target}'  # unless enhancement reported why
        else:
            try:
                rgb = _read_rgb(target)
            except RaveError as exc:
                problem = f'output {target}: {_strip_path(str(exc), target)}'
            else:
                if rgb.shape == rgb_in.shape:
                    return rgb
                problem = (f'output {target} is {rgb.shape[1]}x{rgb.shape[0]}, the input {rgb_in.shape[1]}x'
                           f'{rgb_in.shape[0]}; delete it or pass --overwrite')
        if problem:
            self.result.add_problem(source.name, problem, label)
        return None

    def ground_truth(self, image: str, source: Path, rgb_in: np.ndarray, row: dict) -> Optional[np.ndarray]:
        """The ground truth of one image as uint8 BGR for the metrics, or None (and a recorded problem) when it is
        missing, unreadable or of another size."""
        path = self.plan.ground_truth.get(image)
        reason = None
        if path is None:
            reason = f'no ground truth named {image}.* in {self.plan.gt_dir}'
        else:
            try:
                rgb = _read_rgb(path)
            except RaveError as exc:
                reason = f'ground truth {path}: {_strip_path(str(exc), path)}'
            else:
                if rgb.shape[:2] != rgb_in.shape[:2]:
                    reason = (f'ground truth {path} is {rgb.shape[1]}x{rgb.shape[0]}, the input {rgb_in.shape[1]}x'
                              f'{rgb_in.shape[0]}')
        if reason is not None:
            self.result.add_problem(source.name, reason + '; full-reference metrics skipped for this image')
            row['gt'] = self.cell(None, ['no ground truth'])
            return None
        self.preview(rgb, 'gt', image)
        row['gt'] = self.cell(rgb, [path.name])
        return metric_image(rgb)

    def scores(self, source: Path, rgb: np.ndarray, gt_img: Optional[np.ndarray], label: str) -> Dict[str, float]:
        """The metrics of one output, each called as ``basicsr test`` calls it; a metric that fails on this image
        is recorded as a problem and left out."""
        from basicsr.metrics import calculate_metric

        result_img = metric_image(rgb)
        scores: Dict[str, float] = {}
        for name in self.result.metrics:
            spec = METRICS[name]
            if spec.reference and gt_img is None:
                continue
            if name == 'niqe' and niqe_block_count(*result_img.shape[:2]) < 2:
                if not self.niqe_noted:
                    self.result.notes.append(f'niqe skipped for images smaller than two {NIQE_BLOCK}x{NIQE_BLOCK} '
                                             f'blocks (first: {source.name}, {rgb.shape[1]}x{rgb.shape[0]}).')
                    self.niqe_noted = True
                continue
            try:
                if name == 'guidance':
                    scores[name] = self.scorer(rgb)
                else:
                    data = {'img': result_img, 'img2': gt_img} if spec.reference else {'img': result_img}
                    scores[name] = float(calculate_metric(data, dict(spec.options)))
            except (RaveError, ValueError, ArithmeticError) as exc:  # e.g. NIQE's SVD on a flat image
                self.result.add_problem(source.name, f'{name} failed ({type(exc).__name__}: {exc})', label)
        return scores


def compare_models(input_dir: PathLike, weights: Sequence[str], out_dir: PathLike,
                   gt_dir: Optional[PathLike] = None, metrics: Sequence[str] = DEFAULT_METRICS,
                   encoder: Optional[str] = None, residual: Optional[PathLike] = None, device: str = 'auto',
                   precision: str = 'fp32', tile: Optional[int] = None, overwrite: bool = False,
                   include_input: bool = False, thumb_size: int = 160, grid_limit: int = 50,
                   preview_size: int = 768, progress: bool = True,
                   echo: Callable[[str], None] = print) -> CompareResult:
    """Enhance ``input_dir`` with every network of ``weights`` into ``out_dir``, score the outputs and write the
    report (results.csv, per_image.csv, results.md, grid.png, index.html). Returns the :class:`CompareResult`;
    :attr:`CompareResult.ok` is False when some image failed somewhere (each failure is in ``problems``).

    Arguments as :func:`plan_comparison`; ``device``, ``precision`` and ``tile`` as ``rave enhance``;
    ``thumb_size``: grid cell size in px; ``grid_limit``: at most this many images in the grid (0: all);
    ``preview_size``: longer side of the HTML page's previews. ``progress``: progress bars and per-model and
    per-image lines (through ``echo``); without it only the result tells what happened.
    """
    from tqdm import tqdm

    from rave_basicsr.inference.compare_report import write_reports
    from rave_basicsr.inference.enhance import select_device
    from rave_basicsr.inference.precision import PRECISIONS

    started = time.perf_counter()
    if precision not in PRECISIONS:
        raise RaveError(f'--precision {precision!r}: use one of {", ".join(PRECISIONS)}.')
    plan = plan_comparison(input_dir, weights, out_dir, gt_dir, metrics, encoder, residual, precision, overwrite,
                           include_input)
    torch_device = select_device(device)
    usable, notes = usable_metrics(plan.metrics, gt_dir is not None, residual is not None)
    scorer = GuidanceScorer(plan.residual, plan.encoder, torch_device) if 'guidance' in usable else None
    files = prepare_weights(plan)
    result = CompareResult(plan=plan, metrics=usable, notes=notes)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    _enhance_all(plan, result, files, device, tile, progress, echo if progress else _silent)

    evaluator = _Evaluator(plan, result, scorer, thumb_size, preview_size)
    in_grid = list(plan.inputs)[:grid_limit] if grid_limit else list(plan.inputs)
    rows: Dict[str, dict] = {image: {} for image in in_grid}
    for image, source in tqdm(plan.inputs.items(), desc='metrics', unit='img', disable=not progress,
                              dynamic_ncols=True, file=sys.stderr):
        evaluator.image(image, source, rows.get(image))
    result.files = write_reports(result, rows, thumb_size)
    result.seconds = time.perf_counter() - started
    return result


def _caption(scores: Dict[str, float]) -> List[str]:
    """Grid caption lines: the metrics of an output, two per line."""
    texts = [f'{name} {value:.3f}' if abs(value) < 100 else f'{name} {value:.1f}' for name, value in scores.items()]
    return ['  '.join(texts[i:i + 2]) for i in range(0, min(len(texts), 4), 2)]


def _preview(rgb: np.ndarray, target: Path, size: int) -> None:
    """A JPEG copy of ``rgb`` with its longer side at most ``size`` px, for the HTML page."""
    import cv2

    from rave_basicsr.utils.image_io import encode_image

    height, width = rgb.shape[:2]
    scale = min(1.0, size / max(height, width))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                         interpolation=cv2.INTER_AREA)
    write_image_atomic(str(target), encode_image(rgb, '.jpg', jpeg_quality=90))
