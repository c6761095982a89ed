"""Frozen image encoders for guidance and identity losses, built from an option block.

Three sources share one interface (:class:`FrozenImageEncoder`):

* ``type: open_clip`` — a CLIP model by name with a pretrained tag, a local weights file, a ``local-dir:`` folder,
  or ``~`` for a (seeded) random init. OpenAI weights get QuickGELU, as they were trained with it.
* ``type: timm`` — any timm image model (random init or a local weights file); image-only.
* ``type: arch`` — any module in BasicSR's ``ARCH_REGISTRY`` that maps ``[B, 3, H, W]`` to ``[B, D]`` (for example
  the CLIP-free :class:`~rave_basicsr.archs.image_stats_encoder_arch.ImageStatsEncoder`); image-only.

The encoder keeps its network *outside* ``nn.Module``'s registries: an owner that stores it as an attribute (even an
``nn.Module`` owner) never sees its weights in ``state_dict()``, ``parameters()`` or ``train()``, while ``.to()``
still moves it. Weights that cannot be had offline fail at once with a message naming the file to fetch.
"""
import difflib
import json
import os
import socket
import warnings
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import nn

from rave_basicsr.guidance.preprocess import PreprocessConfig, parse_preprocess, preprocess_images
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.file_io import file_sha256 as sha256_of_file, torch_load_safe


CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'
#: the tiny random-init open_clip configs shipped for tests (never for real use)
TEST_MODEL_CONFIGS = ('rave-test-tiny-vit', 'rave-test-tiny-rn')

#: defaults of the originals (spec §1.2): ViT-B/32 for guidance, RN101 in fp16 for the identity loss
ROLE_DEFAULTS = {
    'guidance': {'type': 'open_clip', 'model': 'ViT-B-32', 'pretrained': 'openai', 'precision': 'fp32'},
    'identity': {'type': 'open_clip', 'model': 'RN101', 'pretrained': 'openai', 'precision': 'fp16'},
}
PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth')
_SHA256_CACHE: Dict[Tuple[str, int, int], str] = {}


class FrozenImageEncoder(nn.Module):
    """A frozen image encoder (optionally with a CLIP text tower); see the module docstring.

    Attributes: ``embed_dim``, ``identity`` (JSON-serialisable; equal identities mean interchangeable encoders),
    ``has_text_tower``, ``preprocess`` (default :class:`PreprocessConfig`, or None for raw [0, 1] input),
    ``precision``. The wrapped network is reachable as ``.network`` for inspection.
    """

    def __init__(self, network: nn.Module, *, embed_dim: int, identity: Dict[str, Any],
                 preprocess: Optional[PreprocessConfig], precision: str,
                 image_fn: Callable[[torch.Tensor], torch.Tensor],
                 features_fn: Optional[Callable[[torch.Tensor], List[torch.Tensor]]] = None,
                 tokenizer: Optional[Callable] = None) -> None:
        super().__init__()
        network.eval()
        network.requires_grad_(False)
        # stored outside nn.Module's registries: never in an owner's state_dict/parameters, never set to train()
        object.__setattr__(self, '_network', network)
        object.__setattr__(self, '_image_fn', image_fn)
        object.__setattr__(self, '_features_fn', features_fn)
        object.__setattr__(self, '_tokenizer', tokenizer)
        self.embed_dim = int(embed_dim)
        self.identity = identity
        self.preprocess = preprocess
        self.precision = precision
        self.has_text_tower = tokenizer is not None
        self.train(False)

    @property
    def network(self) -> nn.Module:
        """The frozen network (open_clip CLIP model, timm model or ARCH_REGISTRY module)."""
        return self._network

    @property
    def device(self) -> torch.device:
        for tensor in list(self._network.parameters()) + list(self._network.buffers()):
            return tensor.device
        return torch.device('cpu')

    def _apply(self, fn, recurse=True):  # noqa: D401  (nn.Module hook used by .to()/.cuda()/.cpu())
        """Move the hidden network along with the module (``.to(device)`` of an owner reaches it)."""
        self._network._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> 'FrozenImageEncoder':
        """Always eval: BatchNorm statistics and dropout of a guidance encoder must never change."""
        super().train(False)
        self._network.eval()
        return self

    def extra_repr(self) -> str:
        return f'identity={json.dumps(self.identity, sort_keys=True)}, precision={self.precision}'

    def _input_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def _run(self, fn: Callable, images: torch.Tensor):
        """Run ``fn`` in the configured precision; on a CPU lacking a half-precision kernel, fall back to fp32."""
        try:
            return fn(images.to(self._input_dtype()))
        except RuntimeError as exc:
            if self.precision == 'fp32' or images.device.type != 'cpu' or 'not implemented for' not in str(exc):
                raise
            warnings.warn(f'{self.precision} is not supported on this CPU for this encoder ({exc}); running it in '
                          'fp32 from now on (documented fallback, see docs/guidance.md).', RuntimeWarning)
            self._network.float()
            self.precision = 'fp32'
            return fn(images.float())

    def prepare(self, images01: torch.Tensor, preprocess: Union[None, Mapping, PreprocessConfig] = None):
        """Images in [0, 1] -> encoder input (the encoder's default preprocessing, or ``preprocess``)."""
        cfg = self.preprocess if preprocess is None else parse_preprocess(
            preprocess, default_size=self.preprocess.size if self.preprocess else 224)
        if cfg is None:
            if images01.dim() != 4 or images01.shape[1] != 3:
                raise RaveError(f'images for the encoder must be a [B, 3, H, W] tensor, got {list(images01.shape)}.')
            return images01
        return preprocess_images(images01, cfg)

    def encode_image(self, images01: torch.Tensor,
                     preprocess: Union[None, Mapping, PreprocessConfig] = None) -> torch.Tensor:
        """``[B, 3, H, W]`` images in [0, 1] -> ``[B, embed_dim]`` float32 embeddings (unnormalised, differentiable)."""
        return self._run(self._image_fn, self.prepare(images01, preprocess)).float()

    def encode_image_features(self, images01: torch.Tensor,
                              preprocess: Union[None, Mapping, PreprocessConfig] = None) -> List[torch.Tensor]:
        """Intermediate feature maps (ResNet towers: stem, layer1..layer4) for the identity loss."""
        if self._features_fn is None:
            raise RaveError(f'encoder {describe_identity(self.identity)} has no intermediate ResNet features '
                            '(stem, layer1..layer4), which the identity loss needs. Use a ResNet tower, e.g. '
                            '{type: open_clip, model: RN101, pretrained: openai} or a timm ResNet.')
        return [f.float() for f in self._run(self._features_fn, self.prepare(images01, preprocess))]

    # ---- text tower (open_clip CLIP models only) ----
    def _require_text(self, what: str) -> None:
        require_text_tower(self, what)

    @property
    def tokenizer(self) -> Any:
        """The open_clip tokenizer (``decode`` lists the vocabulary for residual interpretation)."""
        self._require_text('tokenizer')
        return self._tokenizer

    def tokenize(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Texts -> ``[N, context_length]`` token ids on the encoder's device."""
        self._require_text('tokenize')
        return self._tokenizer([texts] if isinstance(texts, str) else list(texts)).to(self.device)

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> ``[N, context_length, width]`` float32 token embeddings (the soft-prompt space)."""
        self._require_text('token_embedding')
        return self._network.token_embedding(tokens).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> ``[N, embed_dim]`` float32 text embeddings (unnormalised)."""
        self._require_text('encode_text')
        return self._network.encode_text(tokens).float()

    def encode_soft_prompts(self, embeddings: torch.Tensor,
                            eot_index: Union[None, int, torch.Tensor] = None) -> torch.Tensor:
        """Learnable ``[N, context_length, width]`` token embeddings -> ``[N, embed_dim]`` (spec §2.2)."""
        from rave_basicsr.guidance.prompts import encode_token_embeddings, init_eot_index

        self._require_text('encode_soft_prompts')
        if eot_index is None:
            eot_index = init_eot_index(self)
        return encode_token_embeddings(self._network, embeddings, eot_index)


# ---------------------------------------------------------------- checks other parts call
def describe_identity(identity: Mapping[str, Any]) -> str:
    """Short human-readable form of an encoder identity for messages."""
    return json.dumps(dict(identity), sort_keys=True)


def require_text_tower(encoder: FrozenImageEncoder, purpose: str) -> None:
    """Raise a clear RaveError when ``purpose`` (e.g. 'CLIP-LIT text prompts') gets an image-only encoder."""
    if not encoder.has_text_tower:
        raise RaveError(f'{purpose} needs an encoder with a text tower, but the configured encoder '
                        f'{describe_identity(encoder.identity)} is image-only. Use an open_clip CLIP model '
                        '(type: open_clip, e.g. model: ViT-B-32, pretrained: openai), or a method that works with '
                        'image-only encoders: RAVE or CLIP-LIT-Latent (guidance: latent).')


def check_embedding_size(encoder: FrozenImageEncoder, size: int, what: str) -> None:
    """Raise a clear RaveError when ``what`` (a stored residual, a latent pair) has another embedding size."""
    if int(size) != encoder.embed_dim:
        raise RaveError(f'{what} has {int(size)}-dimensional embeddings, but the guidance encoder '
                        f'{describe_identity(encoder.identity)} produces {encoder.embed_dim}-dimensional ones. '
                        'Use the encoder it was computed with, or recompute it with this encoder.')


# ---------------------------------------------------------------- helpers
def file_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a file (cached per path, size and mtime): identifies local weights."""
    path = os.path.realpath(os.fspath(path))
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        _SHA256_CACHE[key] = sha256_of_file(path)
    return _SHA256_CACHE[key]


def _close(name: str, choices: Sequence[str], n: int = 5) -> List[str]:
    lowered = {c.lower(): c for c in choices}
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[m] for m in matches]


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Build (on the CPU) under a fixed seed without disturbing the caller's random state: only the CPU generator
    is seeded and restored (``torch.manual_seed`` would also reseed every GPU's generator, which ``fork_rng``
    does not restore here, and a distributed run would lose its per-rank seeds)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build()


def _parse_seed(opt: Mapping[str, Any], where: str) -> int:
    seed = opt.get('seed', 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RaveError(f'{where}: option "seed" (random-init seed) must be an integer, got {seed!r}.')
    return seed


def _parse_precision(opt: Mapping[str, Any], where: str) -> str:
    precision = opt.get('precision', 'fp32')
    if precision not in PRECISIONS:
        raise RaveError(f'{where}: option "precision" must be one of {list(PRECISIONS)}, got {precision!r}.')
    return precision


def _looks_like_path(value: str) -> bool:
    return os.sep in value or '/' in value or value.lower().endswith(WEIGHT_SUFFIXES)


def _unwrap_state_dict(state: Any, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(state, Mapping):
        for key in ('state_dict', 'params_ema', 'params', 'model'):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RaveError(f'weights file {path!r} does not hold a state dict of tensors.')
    return {(k[7:] if k.startswith('module.') else k): v for k, v in state.items()}


def read_weights_file(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or torch file (weights_only), with ``module.`` stripped."""
    if not os.path.isfile(path):
        raise RaveError(f'weights file {path!r} does not exist.')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return _unwrap_state_dict(load_file(path, device='cpu'), path)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise RaveError(f'weights file {path!r} cannot be read as safetensors ({exc}).') from None
    return _unwrap_state_dict(torch_load_safe(path), path)


def _mismatch_summary(model_state: Mapping[str, torch.Tensor], file_state: Mapping[str, torch.Tensor]) -> str:
    shapes = [k for k in model_state if k in file_state and tuple(model_state[k].shape) != tuple(file_state[k].shape)]
    missing = [k for k in model_state if k not in file_state]
    unexpected = [k for k in file_state if k not in model_state]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f'{len(shapes)} tensor(s) have other shapes (e.g. {k!r}: file {list(file_state[k].shape)}, '
                     f'model {list(model_state[k].shape)})')
    if missing:
        parts.append(f'{len(missing)} tensor(s) the model needs are missing (e.g. {missing[0]!r})')
    if unexpected:
        parts.append(f'{len(unexpected)} tensor(s) are not part of the model (e.g. {unexpected[0]!r})')
    return '; '.join(parts) or 'the tensors do not load'


def _load_checked(module: nn.Module, path: str, what: str, loader: Optional[Callable[[], Any]] = None) -> None:
    """Load the weights file strictly; a misfit becomes a one-line RaveError naming the file, not a shape dump."""
    try:
        if loader is not None:
            loader()
        else:
            module.load_state_dict(read_weights_file(path), strict=True)
    except RaveError:
        raise
    except Exception:  # torch/open_clip raise RuntimeError, KeyError, UnpicklingError... for files that do not fit
        state = read_weights_file(path)  # a RaveError of its own when the file cannot be read at all
        raise RaveError(f'weights file {path!r} does not fit {what}: {_mismatch_summary(module.state_dict(), state)}. '
                        'Name the architecture these weights were trained for in the "model" option '
                        '(or the "network" block).') from None


# ---------------------------------------------------------------- open_clip
def register_test_configs() -> None:
    """Make the tiny test-only configs (``rave-test-tiny-*``) known to open_clip; repeated calls are no-ops."""
    import open_clip

    if not all(name in open_clip.list_models() for name in TEST_MODEL_CONFIGS):
        open_clip.add_model_config(CONFIG_DIR)


def _hub_offline() -> bool:
    value = os.environ.get('HF_HUB_OFFLINE') or os.environ.get('TRANSFORMERS_OFFLINE') or ''
    return value.strip().upper() in {'1', 'ON', 'YES', 'TRUE'}


def _host_reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname
    if not host:
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_tag_file(cfg: Mapping[str, Any], cache_dir: Optional[str]) -> Tuple[Optional[str], str, str]:
    """(cached file or None, what to download, where from) for an open_clip pretrained-tag config."""
    hub = cfg.get('hf_hub', '')
    url = cfg.get('url', '')
    if hub:
        from huggingface_hub import hf_hub_download

        repo, filename = os.path.split(hub)
        filename = filename or 'open_clip_pytorch_model.bin'
        candidates = [filename[:-4] + '.safetensors'] if filename.endswith(('.bin', '.pth')) else []
        if filename == 'open_clip_pytorch_model.bin':
            candidates = ['open_clip_model.safetensors']
        for name in candidates + [filename]:
            try:
                return hf_hub_download(repo_id=repo, filename=name, cache_dir=cache_dir, local_files_only=True), \
                    f'{repo}/{filename}', 'https://huggingface.co'
            except Exception:  # not in the local cache (huggingface_hub raises LocalEntryNotFoundError & co)
                continue
        return None, f'https://huggingface.co/{repo}/resolve/main/{filename}', 'https://huggingface.co'
    target = os.path.join(cache_dir or os.path.expanduser('~/.cache/clip'), os.path.basename(url))
    return (target if os.path.isfile(target) else None), url, url


def _fetch_tag_weights(model: str, tag: str, cache_dir: Optional[str]) -> str:
    """Local path of the weights of ``model``/``tag``: from the cache, else downloaded; offline fails at once."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if 'file' in cfg:
        return cfg['file']
    cached, source, endpoint = _cached_tag_file(cfg, cache_dir)
    if cached:
        return cached
    endpoint = os.environ.get('HF_ENDPOINT', endpoint) if 'huggingface' in endpoint else endpoint
    reason = ('HF_HUB_OFFLINE is set' if _hub_offline()
              else None if _host_reachable(endpoint) else f'{urlparse(endpoint).hostname} cannot be reached')
    hint = (f'Download {source} on a machine with internet access and point the option at the file: '
            f'"model: {model}, pretrained: /path/to/{os.path.basename(source)}"'
            + (', quick_gelu: true' if cfg.get('quick_gelu') else '') + ' (or use "local-dir:FOLDER").')
    if reason:
        raise RaveError(f'pretrained weights {tag!r} of open_clip model {model!r} are not in the local cache and '
                        f'cannot be downloaded ({reason}). {hint}')
    try:
        return open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # network, hub or checksum failure
        raise RaveError(f'downloading pretrained weights {tag!r} of open_clip model {model!r} failed ({exc}). '
                        f'{hint}') from None


def _quick_gelu_option(opt: Mapping[str, Any], where: str) -> Optional[bool]:
    value = opt.get('quick_gelu', 'auto')
    if value == 'auto':
        return None
    if not isinstance(value, bool):
        raise RaveError(f'{where}: option "quick_gelu" must be auto, true or false, got {value!r}.')
    return value


def _find_dir_checkpoint(folder: Path) -> Optional[Path]:
    preferred = ('open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors', 'open_clip_pytorch_model.bin',
                 'open_clip_pytorch_model.pth', 'model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth',
                 'model.pth')
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return found[0] if found else None


def _build_open_clip(opt: Mapping[str, Any], where: str) -> FrozenImageEncoder:
    import open_clip

    register_test_configs()
    name = opt.get('model')
    if not isinstance(name, str) or not name:
        raise RaveError(f'{where}: option "model" must name an open_clip model (e.g. ViT-B-32), got {name!r}.')
    pretrained = opt.get('pretrained')
    precision = _parse_precision(opt, where)
    seed = _parse_seed(opt, where)
    cache_dir = opt.get('cache_dir')
    forced_quick_gelu = _quick_gelu_option(opt, where)
    create_kwargs: Dict[str, Any] = {'precision': precision}
    weights_file: Optional[str] = None
    identity: Dict[str, Any] = {'type': 'open_clip'}

    if name.startswith('hf-hub:'):
        raise RaveError(f'{where}: "model: {name}" is not supported; download the repository '
                        f'(huggingface-cli download {name[7:]} --local-dir FOLDER) and use "model: local-dir:FOLDER".')
    if name.startswith('local-dir:'):
        folder = Path(name[len('local-dir:'):]).expanduser()
        config = folder / 'open_clip_config.json'
        if not config.is_file():
            raise RaveError(f'{where}: "model: {name}" needs a folder with open_clip_config.json; {config} is missing.')
        weights = _find_dir_checkpoint(folder)
        if weights is None:
            raise RaveError(f'{where}: folder {folder} has no weights file (*.safetensors, *.bin, *.pt, *.pth).')
        model_name, weights_file = f'local-dir:{folder}', str(weights)
        identity.update(model='local-dir', config_sha256=file_sha256(config), weights_sha256=file_sha256(weights))
        create_kwargs['load_weights'] = False
    else:
        model_name = name.replace('/', '-')
        known = open_clip.list_models()
        if model_name not in known:
            raise RaveError(f'{where}: unknown open_clip model {name!r}. Close matches: '
                            f'{_close(model_name, known) or "none"} (open_clip.list_models() lists all).')
        base = model_name[:-len('-quickgelu')] if model_name.endswith('-quickgelu') else model_name
        identity['model'] = base
        if pretrained is None or pretrained is False:
            identity.update(pretrained=None, init_seed=seed)
        elif not isinstance(pretrained, str):
            raise RaveError(f'{where}: option "pretrained" must be a tag, a weights file, or ~, got {pretrained!r}.')
        elif open_clip.get_pretrained_cfg(model_name, pretrained):
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            weights_file = _fetch_tag_weights(model_name, pretrained, cache_dir)
            if forced_quick_gelu is None:
                forced_quick_gelu = bool(tag_cfg.get('quick_gelu', False))
            identity['pretrained'] = pretrained.lower().replace('-', '_')
        elif os.path.isfile(pretrained):
            weights_file = pretrained
            identity['weights_sha256'] = file_sha256(pretrained)
        elif _looks_like_path(pretrained):
            raise RaveError(f'{where}: weights file {pretrained!r} (option "pretrained") does not exist.')
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise RaveError(f'{where}: unknown pretrained tag {pretrained!r} for open_clip model {model_name!r}. '
                            + (f'Close matches: {_close(pretrained, tags) or "none"}; all tags: {tags}. '
                               if tags else 'This model has no pretrained tags; ')
                            + 'Give a tag, a path to a weights file, or ~ for random init.')
    if forced_quick_gelu is not None:
        create_kwargs['force_quick_gelu'] = forced_quick_gelu
    try:
        clip = _seeded(seed, lambda: open_clip.create_model(model_name, pretrained=None, **create_kwargs))
    except (RuntimeError, ValueError, FileNotFoundError, KeyError, TypeError) as exc:
        raise RaveError(f'{where}: open_clip cannot build model {name!r}: {exc}') from None
    if weights_file is not None:
        _load_checked(clip, weights_file, f'open_clip model {name!r}',
                      loader=lambda: open_clip.load_checkpoint(clip, weights_file, strict=True))
    quick_gelu = any(isinstance(m, open_clip.transformer.QuickGELU) for m in clip.modules())
    identity['quick_gelu'] = quick_gelu
    embed_dim = int(clip.text_projection.shape[-1] if hasattr(clip, 'text_projection') and
                    isinstance(clip.text_projection, torch.Tensor) else clip.visual.output_dim)
    identity['embed_dim'] = embed_dim
    image_size = clip.visual.image_size
    size = int(image_size if isinstance(image_size, int) else image_size[0])
    preprocess = parse_preprocess(opt.get('preprocess'), default_size=size, where=f'{where}.preprocess')
    visual = clip.visual
    features_fn = None
    if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
        def features_fn(x):
            return visual.forward_intermediates(x, intermediates_only=True)['image_intermediates']
    tokenizer = open_clip.get_tokenizer(model_name) if hasattr(clip, 'token_embedding') else None
    return FrozenImageEncoder(clip, embed_dim=embed_dim, identity=identity, preprocess=preprocess,
                              precision=precision, image_fn=clip.encode_image, features_fn=features_fn,
                              tokenizer=tokenizer)


# ---------------------------------------------------------------- timm
def _build_timm(opt: Mapping[str, Any], where: str) -> FrozenImageEncoder:
    import timm

    name = opt.get('model')
    if not isinstance(name, str) or not timm.is_model(name):
        known = timm.list_models()
        raise RaveError(f'{where}: unknown timm model {name!r}. Close matches: '
                        f'{_close(str(name), known) or "none"} (timm.list_models() lists all).')
    pretrained = opt.get('pretrained')
    precision = _parse_precision(opt, where)
    seed = _parse_seed(opt, where)
    embedding = opt.get('embedding', 'pooled')
    if embedding not in ('pooled', 'head'):
        raise RaveError(f'{where}: option "embedding" must be pooled (features before the classifier) or head '
                        f'(classifier output), got {embedding!r}.')
    kwargs = dict(opt.get('model_kwargs') or {})
    if embedding == 'pooled':
        kwargs['num_classes'] = 0
    identity: Dict[str, Any] = {'type': 'timm', 'model': name, 'embedding': embedding,
                                'model_kwargs': {k: v for k, v in sorted(kwargs.items())}}
    if pretrained in (None, False):
        identity['init_seed'] = seed
    elif isinstance(pretrained, str) and os.path.isfile(pretrained):
        identity['weights_sha256'] = file_sha256(pretrained)
    else:
        raise RaveError(f'{where}: option "pretrained" of a timm encoder must be ~ (random init) or an existing '
                        f'weights file, got {pretrained!r}. Download hub weights on a machine with internet access '
                        'and give the file.')
    try:
        net = _seeded(seed, lambda: timm.create_model(name, pretrained=False, **kwargs))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RaveError(f'{where}: timm cannot build {name!r} with model_kwargs {kwargs}: {exc}') from None
    if pretrained:
        state = read_weights_file(pretrained)
        if embedding == 'pooled':
            head = net.pretrained_cfg.get('classifier')
            heads = [head] if isinstance(head, str) else list(head or [])
            state = {k: v for k, v in state.items() if not any(k.startswith(h + '.') for h in heads)}
        _load_checked(net, pretrained, f'timm model {name!r}', loader=lambda: net.load_state_dict(state, strict=True))
    data_cfg = timm.data.resolve_model_data_config(net)
    preprocess = parse_preprocess(opt.get('preprocess'), default_size=int(data_cfg['input_size'][-1]),
                                  default_mean=data_cfg['mean'], default_std=data_cfg['std'],
                                  where=f'{where}.preprocess')
    net = net.to(PRECISIONS[precision])
    features_fn = None
    if hasattr(net, 'forward_intermediates'):
        def features_fn(x):
            return net.forward_intermediates(x, intermediates_only=True)
    embed_dim = _probe_embed_dim(net, preprocess.size, PRECISIONS[precision], where)
    identity['embed_dim'] = embed_dim
    return FrozenImageEncoder(net, embed_dim=embed_dim, identity=identity, preprocess=preprocess,
                              precision=precision, image_fn=net, features_fn=features_fn)


# ---------------------------------------------------------------- ARCH_REGISTRY
def _probe_embed_dim(net: nn.Module, size: int, dtype: torch.dtype, where: str) -> int:
    with torch.no_grad():
        out = net(torch.zeros(1, 3, size, size, dtype=dtype))
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RaveError(f'{where}: the encoder network must map [B, 3, H, W] images to [B, D] embeddings, '
                        f'but it returned {shape} for a [1, 3, {size}, {size}] input.')
    return int(out.shape[1])


def _build_arch(opt: Mapping[str, Any], where: str) -> FrozenImageEncoder:
    from basicsr.utils.registry import ARCH_REGISTRY

    net_opt = opt.get('network')
    if not isinstance(net_opt, Mapping) or not isinstance(net_opt.get('type'), str):
        raise RaveError(f'{where}: "type: arch" needs a "network" block with a "type" naming an ARCH_REGISTRY '
                        'module, e.g. network: {type: ImageStatsEncoder}.')
    net_opt = deepcopy(dict(net_opt))
    arch_type = net_opt.pop('type')
    try:
        arch_class = ARCH_REGISTRY.get(arch_type)  # also finds BasicSR's suffixed names ('<name>_basicsr')
    except KeyError:
        raise RaveError(f'{where}: network type {arch_type!r} is not in ARCH_REGISTRY. Close matches: '
                        f'{_close(arch_type, list(ARCH_REGISTRY.keys())) or "none"}.') from None
    pretrained = opt.get('pretrained')
    precision = _parse_precision(opt, where)
    seed = _parse_seed(opt, where)
    try:
        net = _seeded(seed, lambda: arch_class(**net_opt))
    except TypeError as exc:
        raise RaveError(f'{where}: network {arch_type!r} rejects options {net_opt}: {exc}') from None
    identity: Dict[str, Any] = {'type': 'arch', 'network': {'type': arch_type, **dict(sorted(net_opt.items()))}}
    if pretrained not in (None, False):
        if not isinstance(pretrained, str):
            raise RaveError(f'{where}: option "pretrained" must be ~ or a weights file, got {pretrained!r}.')
        _load_checked(net, pretrained, f'network {arch_type!r}')
        identity['weights_sha256'] = file_sha256(pretrained)
    elif any(True for _ in net.parameters()):
        identity['init_seed'] = seed
    preprocess = None
    if opt.get('preprocess') is not None:
        preprocess = parse_preprocess(opt['preprocess'], where=f'{where}.preprocess')
    net = net.to(PRECISIONS[precision])
    embed_dim = _probe_embed_dim(net, preprocess.size if preprocess else 64, PRECISIONS[precision], where)
    identity['embed_dim'] = embed_dim
    features_fn = None
    if hasattr(net, 'forward_intermediates'):  # the timm convention: a list of feature maps
        def features_fn(x):
            return net.forward_intermediates(x, intermediates_only=True)
    return FrozenImageEncoder(net, embed_dim=embed_dim, identity=identity, preprocess=preprocess,
                              precision=precision, image_fn=net, features_fn=features_fn)


BUILDERS = {'open_clip': _build_open_clip, 'timm': _build_timm, 'arch': _build_arch}


def build_image_encoder(opt: Optional[Mapping[str, Any]] = None, role: str = 'guidance',
                        where: Optional[str] = None) -> FrozenImageEncoder:
    """Build a frozen encoder from an option block; missing keys take the originals' defaults for ``role``.

    ``role`` is ``guidance`` (ViT-B-32, OpenAI weights, fp32) or ``identity`` (RN101, OpenAI weights, fp16); the
    defaults apply only to an ``open_clip`` block. ``where`` names the option block in messages.
    """
    if role not in ROLE_DEFAULTS:
        raise ValueError(f'role must be one of {list(ROLE_DEFAULTS)}, got {role!r}')
    where = where or f'{role} encoder'
    opt = dict(opt or {})
    kind = opt.get('type', 'open_clip')
    if kind not in BUILDERS:
        raise RaveError(f'{where}: option "type" must be one of {list(BUILDERS)}, got {kind!r}.')
    if kind == 'open_clip':
        opt = {**ROLE_DEFAULTS[role], **opt}
    return BUILDERS[kind](opt, where)
