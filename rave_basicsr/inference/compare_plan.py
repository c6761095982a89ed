"""Planning a comparison of enhancement networks on a test set (``rave compare``, docs/compare.md): the metrics,
the models and their labels, the images and ground truth, and the record of what was measured.

:func:`plan_comparison` checks every argument (images, ground truth, weights, labels, metrics, encoder and residual,
earlier outputs) before anything is loaded or downloaded; problems raise :class:`RaveError`.
:mod:`rave_basicsr.inference.compare` runs the plan.
"""
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from rave_basicsr.inference.weights import OFFICIAL_WEIGHTS
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.file_io import file_sha256
from rave_basicsr.utils.image_io import IMAGE_EXTENSIONS, is_image_file
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
