"""The residual vector of RAVE (definition: :mod:`rave_basicsr.residual.compute`) and its file format.

A residual file is a ``.safetensors`` file: the tensors ``residual``, ``well_lit_mean``, ``backlit_mean`` (and,
when kept, ``embeddings.well_lit`` / ``embeddings.backlit``), with everything else as JSON strings in the
safetensors header metadata (``format``, ``format_version``, ``threshold``, ``counts``, ``encoder_identity``,
``preprocess``, ``history``). Safetensors holds no code, so a residual file from anyone is safe to load; the file is
written atomically and never replaces an existing file unless asked.
"""
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch

from rave_basicsr.utils.errors import RaveError

FORMAT_NAME = 'rave_basicsr.residual_vector'
FORMAT_VERSION = 1
#: tolerance of the unit-norm and threshold consistency checks on load (float32 round-off is ~1e-7)
LOAD_TOLERANCE = 1e-4
_VECTOR_KEYS = ('residual', 'well_lit_mean', 'backlit_mean')
_SETS = ('well_lit', 'backlit')
_META_KEYS = ('threshold', 'counts', 'encoder_identity', 'preprocess', 'history')


def canonical_identity(identity: Any) -> str:
    """Canonical JSON of an encoder identity: two identities are equal iff these strings are."""
    return json.dumps(identity, sort_keys=True, separators=(',', ':'))


def _identity_difference(stored: Dict[str, Any], given: Dict[str, Any]) -> str:
    keys = sorted(set(stored) | set(given))
    diffs = [f'{k}: file {stored.get(k, "<absent>")!r} vs encoder {given.get(k, "<absent>")!r}'
             for k in keys if canonical_identity(stored.get(k)) != canonical_identity(given.get(k))]
    return '; '.join(diffs)


@dataclass
class ResidualVector:
    """A residual direction with the facts needed to use and audit it.

    ``residual``, ``well_lit_mean`` and ``backlit_mean`` are float32 ``[D]`` unit vectors; ``threshold`` is
    ``<well_lit_mean, residual>``; ``counts`` the number of images behind each mean; ``encoder_identity`` the
    ``FrozenImageEncoder.identity`` of the encoder that made it; ``preprocess`` how images became encoder input;
    ``embeddings`` the per-image embeddings (``{'well_lit': [N, D], 'backlit': [M, D]}``) when kept; ``history``
    the steps that produced it (compute, debiasing), each a JSON-serialisable dict.
    """
    residual: torch.Tensor
    threshold: float
    well_lit_mean: torch.Tensor
    backlit_mean: torch.Tensor
    counts: Dict[str, int]
    encoder_identity: Dict[str, Any]
    preprocess: Dict[str, Any]
    embeddings: Optional[Dict[str, torch.Tensor]] = None
    history: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def dim(self) -> int:
        """Embedding size D."""
        return int(self.residual.numel())

    @property
    def mean_distance(self) -> float:
        """``|v_well_lit - v_backlit|``: the residual's length before normalisation, i.e. how far apart the two sets'
        mean embeddings lie (the step :class:`~rave_basicsr.losses.clip_guidance_loss.ResidualTranslationLoss`
        moves each image by)."""
        return float((self.well_lit_mean.double() - self.backlit_mean.double()).norm())

    # ------------------------------------------------------------------ saving
    def _tensors(self) -> Dict[str, torch.Tensor]:
        tensors = {k: getattr(self, k).detach().to('cpu', torch.float32).contiguous() for k in _VECTOR_KEYS}
        for name, value in (self.embeddings or {}).items():
            tensors[f'embeddings.{name}'] = value.detach().to('cpu', torch.float32).contiguous()
        return tensors

    def _metadata(self) -> Dict[str, str]:
        meta = {'format': FORMAT_NAME, 'format_version': str(FORMAT_VERSION)}
        for key in _META_KEYS:
            try:
                meta[key] = json.dumps(getattr(self, key), sort_keys=True)
            except TypeError as exc:
                raise RaveError(f'residual field {key!r} is not JSON-serialisable ({exc}).') from None
        return meta

    def save(self, path: Union[str, os.PathLike], overwrite: bool = False) -> None:
        """Write the ``.safetensors`` file atomically; an existing file is an error unless ``overwrite``."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        if os.path.isdir(path):
            raise RaveError(f'{path} is a folder; give a file name for the residual (e.g. residual.safetensors).')
        if os.path.exists(path) and not overwrite:
            raise RaveError(f'{path} already exists; choose another output name or pass --overwrite '
                            '(overwrite=True) to replace it.')
        self.validate(where='residual to save')
        tensors, metadata = self._tensors(), self._metadata()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata=metadata)
            with open(temporary, 'rb') as stream:
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> 'ResidualVector':
        """Read and validate a residual file; any problem is a :class:`RaveError` naming the file and the key."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise RaveError(f'residual file {path!r} does not exist (make one with `rave residual compute`).')
        try:
            with safe_open(path, framework='pt', device='cpu') as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as exc:  # safetensors raises SafetensorError / OSError on damaged or foreign files
            raise RaveError(f'residual file {path!r} cannot be read as safetensors ({exc}); it is corrupt or not a '
                            'residual file.') from None
        if metadata.get('format') != FORMAT_NAME:
            raise RaveError(f'{path!r} is a safetensors file but not a rave_basicsr residual vector (its header '
                            f'"format" is {metadata.get("format")!r}, expected {FORMAT_NAME!r}).')
        if metadata.get('format_version') != str(FORMAT_VERSION):
            raise RaveError(f'residual file {path!r} has format version {metadata.get("format_version")!r}; this '
                            f'rave_basicsr reads version {FORMAT_VERSION}. Recompute it with `rave residual compute`.')
        fields: Dict[str, Any] = {}
        for key in _META_KEYS:
            if key not in metadata:
                raise RaveError(f'residual file {path!r}: header entry {key!r} is missing; the file is damaged.')
            try:
                fields[key] = json.loads(metadata[key])
            except json.JSONDecodeError:
                raise RaveError(f'residual file {path!r}: header entry {key!r} is not valid JSON.') from None
        for key in _VECTOR_KEYS:
            if key not in tensors:
                raise RaveError(f'residual file {path!r}: tensor {key!r} is missing; the file is damaged.')
            fields[key] = tensors[key]
        embeddings = {k.split('.', 1)[1]: v for k, v in tensors.items() if k.startswith('embeddings.')}
        vector = cls(embeddings=embeddings or None, **fields)
        vector.validate(where=f'residual file {path!r}')
        return vector

    def validate(self, where: str = 'residual') -> None:
        """Check shapes, unit norms, the threshold and the counts; raise a :class:`RaveError` naming the problem."""
        if not isinstance(self.residual, torch.Tensor) or self.residual.dim() != 1 or self.residual.numel() == 0:
            raise RaveError(f'{where}: "residual" must be a non-empty 1-D tensor.')
        dim = self.residual.numel()
        for key in _VECTOR_KEYS:
            value = getattr(self, key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (dim,):
                shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise RaveError(f'{where}: "{key}" must be a [{dim}] tensor like "residual", got {shape}.')
            if not torch.isfinite(value).all():
                raise RaveError(f'{where}: "{key}" contains NaN or Inf values.')
            norm = float(value.double().norm())
            if abs(norm - 1.0) > LOAD_TOLERANCE:
                raise RaveError(f'{where}: "{key}" must have unit norm, but its norm is {norm:.6f}.')
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold):
            raise RaveError(f'{where}: "threshold" must be a finite number, got {self.threshold!r}.')
        expected = float(self.well_lit_mean.double() @ self.residual.double())
        if abs(expected - self.threshold) > LOAD_TOLERANCE:
            raise RaveError(f'{where}: "threshold" is {self.threshold:.6f}, but <well_lit_mean, residual> is '
                            f'{expected:.6f}; the file is inconsistent (edited by hand?). Recompute it.')
        if not isinstance(self.counts, dict) or set(self.counts) != set(_SETS) or \
                not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.counts.values()):
            raise RaveError(f'{where}: "counts" must be {{"well_lit": N, "backlit": M}} with positive integers, '
                            f'got {self.counts!r}.')
        if not isinstance(self.encoder_identity, dict) or not isinstance(self.preprocess, dict) \
                or not isinstance(self.history, list):
            raise RaveError(f'{where}: "encoder_identity" and "preprocess" must be objects and "history" a list.')
        if self.embeddings is not None:
            if set(self.embeddings) != set(_SETS):
                raise RaveError(f'{where}: stored embeddings must be exactly {list(_SETS)}, got '
                                f'{sorted(self.embeddings)}.')
            for name in _SETS:
                value = self.embeddings[name]
                if value.dim() != 2 or value.shape[1] != dim or value.shape[0] != self.counts[name]:
                    raise RaveError(f'{where}: embeddings "{name}" must be [{self.counts[name]}, {dim}] '
                                    f'(counts x D), got {list(value.shape)}.')

    # ------------------------------------------------------------------ use
    def check_encoder(self, encoder: Any) -> None:
        """Raise a :class:`RaveError` unless ``encoder`` (a ``FrozenImageEncoder``) is the one that made this.

        Two encoders are interchangeable iff their identities are equal (architecture contract); the embedding
        size is checked too, so that a mismatch is reported as such rather than as a shape error later.
        """
        embed_dim = int(getattr(encoder, 'embed_dim'))
        identity = dict(getattr(encoder, 'identity'))
        if embed_dim != self.dim:
            raise RaveError(f'the residual has {self.dim}-dimensional embeddings, but the encoder '
                            f'{canonical_identity(identity)} produces {embed_dim}-dimensional ones. Use the encoder '
                            'the residual was computed with, or recompute the residual with this encoder '
                            '(`rave residual compute`).')
        if canonical_identity(identity) != canonical_identity(self.encoder_identity):
            raise RaveError('the residual was computed with another encoder ('
                            f'{_identity_difference(self.encoder_identity, identity)}). Use the encoder it was '
                            f'computed with ({canonical_identity(self.encoder_identity)}), or recompute the residual '
                            'with this encoder (`rave residual compute`).')

    def with_direction(self, residual: torch.Tensor, step: Dict[str, Any]) -> 'ResidualVector':
        """A copy with a new (normalised) residual direction, its threshold, and ``step`` appended to the history."""
        residual = residual.detach().to(torch.float64)
        norm = float(residual.norm())
        if not math.isfinite(norm) or norm < 1e-8:
            raise RaveError('the new residual direction is zero: the removed directions span the whole residual. '
                            'Remove fewer tokens or concepts.')
        direction = (residual / norm).to(torch.float32)
        threshold = float(self.well_lit_mean.double() @ direction.double())
        return ResidualVector(residual=direction, threshold=threshold, well_lit_mean=self.well_lit_mean.clone(),
                              backlit_mean=self.backlit_mean.clone(), counts=dict(self.counts),
                              encoder_identity=dict(self.encoder_identity), preprocess=dict(self.preprocess),
                              embeddings=None if self.embeddings is None else dict(self.embeddings),
                              history=list(self.history) + [dict(step)])
