"""Compare enhancement networks on a test set (``rave compare``, docs/compare.md).

One call enhances a folder of test images with every network given (released names, ``.pth`` files, BasicSR
checkpoints or experiment folders), reusing outputs that are already there, then scores every output with the
metrics that ``basicsr test`` uses (the same registered functions, called the same way on the same uint8 images),
and writes a report (:mod:`rave_basicsr.inference.compare_report`).

* :func:`plan_comparison` checks every argument (images, ground truth, weights, labels, metrics, encoder and residual,
  earlier outputs) before anything is loaded or downloaded; problems raise :class:`RaveError`.
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
import os
import re
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from rave_basicsr.inference.weights import (OFFICIAL_WEIGHTS, check_state_dict_matches, load_enhancement_state_dict,
                                            resolve_weights)
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.file_io import file_sha256
from rave_basicsr.utils.image_io import IMAGE_EXTENSIONS, is_image_file, read_image, write_image_atomic
from rave_basicsr.utils.options import close_matches_hint

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class MetricSpec:
    """A metric of the comparison: the option block handed to BasicSR's ``calculate_metric`` (exactly as in a
    ``val: metrics`` entry of ``options/test_rave.yml``), whether it needs the ground truth, and its direction."""
    name: str
    options: Dict[str, object]
    reference: bool
    better: str  # 'higher' or 'lower'
    title: str


#: the metrics ``rave compare`` knows, in report order
METRICS: 'OrderedDict[str, MetricSpec]' = OrderedDict((m.name, m) for m in [
    MetricSpec('psnr', {'type': 'calculate_rave_psnr'}, True, 'higher', 'PSNR (grey, dB)'),
    MetricSpec('ssim', {'type': 'calculate_rave_ssim'}, True, 'higher', 'SSIM (grey)'),
    MetricSpec('lpips', {'type': 'calculate_rave_lpips'}, True, 'lower', 'LPIPS (1024 px)'),
    MetricSpec('niqe', {'type': 'calculate_niqe', 'crop_border': 0}, False, 'lower', 'NIQE'),
    MetricSpec('guidance', {'type': 'calculate_guidance_score'}, False, 'higher', 'guidance score'),
    MetricSpec('psnr_rgb', {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False}, True, 'higher',
               'PSNR (RGB, dB)'),
    MetricSpec('ssim_rgb', {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': False}, True, 'higher',
               'SSIM (RGB)'),
])
#: the RAVE paper's protocol (grey PSNR/SSIM, LPIPS) and the no-reference metrics
DEFAULT_METRICS = ('psnr', 'ssim', 'lpips', 'niqe', 'guidance')
#: NIQE fits a Gaussian to the features of 96x96 blocks: it needs at least two of them
NIQE_BLOCK = 96
#: names inside OUTDIR that a model label may not take
RESERVED_LABELS = ('input', 'gt', 'previews', 'results.csv', 'per_image.csv', 'results.md', 'grid.png', 'index.html')
MANIFEST = 'weights.json'
_LABEL_CHARACTERS = re.compile(r'[^A-Za-z0-9._+-]+')


@dataclass
class ModelSpec:
    """One network to compare.

    ``source`` is ``released`` (a name of :data:`OFFICIAL_WEIGHTS`), ``file`` (an official ``.pth`` or a BasicSR
    checkpoint), ``experiment`` (a BasicSR experiment folder, meaning its ``models/net_g_latest.pth``) or ``input``
    (the unenhanced inputs, a baseline row). ``path`` is the local weights file (None for a released name until it
    is fetched)."""
    label: str
    spec: str
    source: str
    path: Optional[Path] = None
    name: Optional[str] = None

    @property
    def is_input(self) -> bool:
        return self.source == 'input'

    def describe(self) -> str:
        """The weights as people recognise them: the released name, or the file."""
        if self.is_input:
            return 'the inputs, unenhanced'
        return self.name if self.source == 'released' else str(self.path)

    def sha256(self) -> str:
        """The weights' SHA-256 (a released name's is known without fetching the file)."""
        return OFFICIAL_WEIGHTS[self.name].sha256 if self.source == 'released' else file_sha256(self.path)


@dataclass
class Problem:
    """Something that went wrong with one image (for some models, or for all when ``models`` is empty)."""
    image: str
    message: str
    models: List[str] = field(default_factory=list)

    def describe(self) -> str:
        who = f' [{", ".join(self.models)}]' if self.models else ''
        return f'{self.image}: {self.message}{who}'


@dataclass
class ComparePlan:
    """Everything :func:`compare_models` will do, checked: see :func:`plan_comparison`."""
    input_dir: Path
    inputs: 'OrderedDict[str, Path]'            # image stem -> input file, sorted by file name
    out_dir: Path
    models: List[ModelSpec]
    metrics: List[str]
    gt_dir: Optional[Path] = None
    ground_truth: Dict[str, Path] = field(default_factory=dict)   # stem -> ground-truth file
    encoder: Optional[str] = None
    residual: Optional[Path] = None
    precision: str = 'fp32'
    overwrite: bool = False


@dataclass
class CompareResult:
    """What :func:`compare_models` measured and wrote.

    ``values[label][image][metric]`` holds the per-image metrics (images by stem; a metric that could not be
    computed for an image is absent), ``notes`` the metrics skipped altogether and why, ``problems`` every image
    that failed somewhere, ``enhanced`` / ``reused`` the outputs written and found per model, ``files`` the
    report files written."""
    plan: ComparePlan
    metrics: List[str]
    values: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)
    problems: List[Problem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    enhanced: Dict[str, int] = field(default_factory=dict)
    reused: Dict[str, int] = field(default_factory=dict)
    files: Dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def images(self) -> List[str]:
        return list(self.plan.inputs)

    @property
    def models(self) -> List[ModelSpec]:
        return self.plan.models

    def add_problem(self, image: str, message: str, model: Optional[str] = None) -> None:
        """Record a problem; the same message for the same image is kept once, with the models it concerns."""
        for problem in self.problems:
            if problem.image == image and problem.message == message:
                if model is None:
                    problem.models = []
                elif problem.models and model not in problem.models:
                    problem.models.append(model)
                return
        self.problems.append(Problem(image, message, [] if model is None else [model]))

    def scores(self, label: str, metric: str) -> List[float]:
        """The per-image values of ``metric`` for model ``label``, in image order."""
        per_image = self.values.get(label, {})
        return [per_image[image][metric] for image in self.images
                if image in per_image and metric in per_image[image]]

    def mean(self, label: str, metric: str) -> Optional[float]:
        """Mean of ``metric`` over the images where it was computed (None when it was computed for none)."""
        scores = self.scores(label, metric)
        return float(np.mean(scores)) if scores else None

    def evaluated(self, label: str) -> int:
        """Number of images whose output of model ``label`` was evaluated."""
        return len(self.values.get(label, {}))


# ---------------------------------------------------------------------------------------------------- planning
def list_images(folder: PathLike, what: str) -> 'OrderedDict[str, Path]':
    """The image files of ``folder`` (not its sub-folders) by name without extension, sorted by file name.

    ``what`` names the folder in messages (``INPUT_DIR``, ``--gt``). Raises :class:`RaveError` when the folder
    cannot be listed, holds no image, or two images share a name without extension."""
    folder = Path(folder)
    if not folder.exists():
        raise RaveError(f'{what} {folder}: no such folder.')
    if not folder.is_dir():
        raise RaveError(f'{what} {folder}: not a folder; give the folder that holds the images.')
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))
    except OSError as exc:
        raise RaveError(f'{what} {folder}: cannot be read ({exc.strerror}); check its permissions.') from None
    if not files:
        raise RaveError(f'{what} {folder}: no images found (extensions {", ".join(IMAGE_EXTENSIONS)}; '
                        'sub-folders are not searched).')
    images: 'OrderedDict[str, Path]' = OrderedDict()
    for path in files:
        if path.stem in images:
            raise RaveError(f'{what} {folder}: {images[path.stem].name} and {path.name} have the same name without '
                            'extension, so their outputs (and ground truths) would be confused; rename one.')
        images[path.stem] = path
    return images


def split_label(argument: str) -> Tuple[Optional[str], str]:
    """``LABEL=SPEC`` -> (LABEL, SPEC); anything else (including an existing path containing ``=``) -> (None, it)."""
    label, sep, spec = argument.partition('=')
    if sep and spec and label and not _LABEL_CHARACTERS.search(label) and not Path(argument).exists():
        return label, spec
    return None, argument


def resolve_model_spec(spec: str) -> ModelSpec:
    """A :class:`ModelSpec` (label still empty) for ``--weights SPEC``: an existing file, an experiment folder
    (its ``models/net_g_latest.pth``), or a released name. Nothing is loaded or downloaded."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for candidate in (path / 'models' / 'net_g_latest.pth', path / 'net_g_latest.pth'):
            if candidate.is_file():
                return ModelSpec('', spec, 'experiment', path=candidate)
        models = path / 'models' if (path / 'models').is_dir() else path
        found = sorted(p.name for p in models.glob('*.pth'))
        hint = (f' It holds {", ".join(found[:6])}{" ..." if len(found) > 6 else ""}: pass one of them as the file.'
                if found else ' Train it first (basicsr train), or pass a .pth file.')
        raise RaveError(f'--weights {spec}: a folder, but not a BasicSR experiment with a checkpoint: '
                        f'{path / "models" / "net_g_latest.pth"} does not exist.{hint}')
    if path.is_file():
        return ModelSpec('', spec, 'file', path=path)
    if spec in OFFICIAL_WEIGHTS:
        return ModelSpec('', spec, 'released', name=spec)
    raise RaveError(f'--weights {spec}: no such file or folder, and not a released name ({", ".join(OFFICIAL_WEIGHTS)})'
                    f'{close_matches_hint(spec, OFFICIAL_WEIGHTS)}')


def default_label(model: ModelSpec) -> str:
    """A label from the weights: the released name, the experiment's name (``NAME`` for
    ``experiments/NAME/models/net_g_latest.pth``, ``NAME_net_g_5000`` for another checkpoint of it), else the
    file name without extension."""
    if model.source == 'released':
        return model.name
    path = Path(os.path.abspath(model.path))
    if path.parent.name == 'models' and path.stem.startswith('net_g') and path.parent.parent.name:
        experiment = path.parent.parent.name
        return experiment if path.stem == 'net_g_latest' else f'{experiment}_{path.stem}'
    return path.stem


def safe_label(text: str) -> str:
    """``text`` as a folder name that is safe everywhere: letters, digits and ``._+-``; never empty or hidden."""
    label = _LABEL_CHARACTERS.sub('_', text).strip('._') or 'model'
    return label[:80]


def assign_labels(models: List[ModelSpec], explicit: Sequence[Optional[str]]) -> None:
    """Set each model's label: the explicit one (``LABEL=SPEC``), else :func:`default_label` made safe; derived
    labels that collide (ignoring case, as some file systems do) get ``-2``, ``-3``...; explicit duplicates and
    reserved names are errors."""
    taken = set()
    for model, label in zip(models, explicit):
        if label is not None:
            if label.lower() in RESERVED_LABELS or label.lower() in taken:
                raise RaveError(f'--weights {label}={model.spec}: the label {label!r} is '
                                f'{"reserved" if label.lower() in RESERVED_LABELS else "given twice"}; choose '
                                'another one.')
            taken.add(label.lower())
            model.label = label
    for model, label in zip(models, explicit):
        if label is None:
            base = safe_label(default_label(model))
            candidate, number = base, 1
            while candidate.lower() in taken or candidate.lower() in RESERVED_LABELS:
                number += 1
                candidate = f'{base}-{number}'
            taken.add(candidate.lower())
            model.label = candidate


def output_path(out_dir: Path, label: str, image: str) -> Path:
    """Where model ``label``'s output for image ``image`` (a stem) lives."""
    return out_dir / label / f'{image}.png'


def weights_record(model: ModelSpec, precision: str) -> Dict[str, str]:
    """What :data:`MANIFEST` records about the weights that made a folder of outputs."""
    return {'weights': model.describe(), 'sha256': model.sha256(), 'precision': precision}


def check_earlier_outputs(plan: ComparePlan) -> None:
    """Refuse to mix outputs: a model folder whose :data:`MANIFEST` names other weights (or precision) than the
    model now given raises :class:`RaveError`, unless ``overwrite``."""
    if plan.overwrite:
        return
    for model in plan.models:
        if model.is_input:
            continue
        manifest = plan.out_dir / model.label / MANIFEST
        if not manifest.is_file():
            continue
        try:
            earlier = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise RaveError(f'{manifest} cannot be read ({exc}); delete it or pass --overwrite.') from None
        now = weights_record(model, plan.precision)
        if earlier.get('sha256') != now['sha256'] or earlier.get('precision') != now['precision']:
            raise RaveError(f'{plan.out_dir / model.label} holds outputs of {earlier.get("weights")} '
                            f'(precision {earlier.get("precision")}), not of {now["weights"]} (precision '
                            f'{plan.precision}). Pass --overwrite to replace them, choose another -o folder, or '
                            f'give this model another label (--weights LABEL={model.spec}).')


def plan_comparison(input_dir: PathLike, weights: Sequence[str], out_dir: PathLike,
                    gt_dir: Optional[PathLike] = None, metrics: Sequence[str] = DEFAULT_METRICS,
                    encoder: Optional[str] = None, residual: Optional[PathLike] = None, precision: str = 'fp32',
                    overwrite: bool = False, include_input: bool = False) -> ComparePlan:
    """Check every argument of a comparison and return the plan; bad arguments raise :class:`RaveError`.

    ``weights``: released names, ``.pth`` files, BasicSR checkpoints or experiment folders, each optionally
    ``LABEL=SPEC``. ``metrics``: names of :data:`METRICS`. ``residual`` (a ``rave residual`` file) gives the
    direction of the guidance score, ``encoder`` (an ``--encoder`` spec) the encoder to score with (default: the
    one the residual file records). Nothing is loaded or downloaded here.
    """
    inputs = list_images(input_dir, 'INPUT_DIR')
    ground_truth: Dict[str, Path] = {}
    if gt_dir is not None:
        ground_truth = list_images(gt_dir, '--gt')
        if not set(ground_truth) & set(inputs):
            raise RaveError(f'--gt {gt_dir}: none of its {len(ground_truth)} images has the name (without extension) '
                            f'of one of the {len(inputs)} inputs in {input_dir}; ground truths are matched to inputs '
                            'by file name.')
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RaveError(f'-o {out_dir}: exists and is not a folder.')
    for folder, what in ((input_dir, 'INPUT_DIR'), (gt_dir, '--gt')):
        if folder is not None and out_dir.resolve() == Path(folder).resolve():
            raise RaveError(f'-o {out_dir} is {what}; the report\'s images would be taken for test images next time. '
                            'Choose another output folder.')
    if not weights:
        raise RaveError('--weights: give at least one network (a released name, a .pth file or an experiment '
                        'folder).')
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise RaveError(f'--metrics {" ".join(unknown)}: unknown; choose from {", ".join(METRICS)}'
                        f'{close_matches_hint(unknown[0], METRICS)}')
    if encoder and residual is None:
        raise RaveError('--encoder needs --residual FILE: the guidance score measures the outputs along the residual '
                        'direction (`rave residual compute`).')
    if residual is not None and not Path(residual).is_file():
        raise RaveError(f'--residual {residual}: no such file (make one with `rave residual compute`).')
    models, explicit = [], []
    for argument in weights:
        label, spec = split_label(str(argument))
        models.append(resolve_model_spec(spec))
        explicit.append(label)
    assign_labels(models, explicit)
    if include_input:
        models.insert(0, ModelSpec('input', 'input', 'input'))
    plan = ComparePlan(input_dir=Path(input_dir), inputs=inputs, out_dir=out_dir, models=models,
                       metrics=list(OrderedDict.fromkeys(metrics)), gt_dir=None if gt_dir is None else Path(gt_dir),
                       ground_truth=ground_truth, encoder=encoder,
                       residual=None if residual is None else Path(residual), precision=precision,
                       overwrite=overwrite)
    check_earlier_outputs(plan)
    return plan


# ---------------------------------------------------------------------------------------------------- metrics
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
