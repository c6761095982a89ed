"""open_clip encoders: a CLIP model by name with a pretrained tag, a local weights file, a ``local-dir:`` folder,
or ``~`` for a (seeded) random init. OpenAI weights get QuickGELU, as they were trained with it.

Weights that cannot be had offline fail at once (``HF_HUB_OFFLINE``, or the host unreachable within seconds) with
a message naming the file to fetch and how to point the option at it.
"""
import os
import socket
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple
from urllib.parse import urlparse

import torch

from rave_basicsr.guidance.encoder_loading import (WEIGHT_SUFFIXES, build_seeded, close_matches, load_checked,
                                                   looks_like_path, parse_precision, parse_seed)
from rave_basicsr.guidance.frozen_encoder import FrozenImageEncoder
from rave_basicsr.guidance.preprocess import parse_preprocess
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.file_io import file_sha256

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'
#: the tiny random-init open_clip configs shipped for tests (never for real use)
TEST_MODEL_CONFIGS = ('rave-test-tiny-vit', 'rave-test-tiny-rn')


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


class _Source:
    """What an open_clip option block resolves to: the model name to build, the weights file to load (None:
    random init), whether QuickGELU is forced, and the identity so far."""

    def __init__(self, model_name: str, weights_file: Optional[str], quick_gelu: Optional[bool],
                 identity: Dict[str, Any], load_config_weights: bool = True) -> None:
        self.model_name, self.weights_file, self.quick_gelu = model_name, weights_file, quick_gelu
        self.identity, self.load_config_weights = identity, load_config_weights


def _local_dir_source(name: str, where: str) -> _Source:
    """``model: local-dir:FOLDER``: a downloaded Hugging Face open_clip repository (config + weights)."""
    folder = Path(name[len('local-dir:'):]).expanduser()
    config = folder / 'open_clip_config.json'
    if not config.is_file():
        raise RaveError(f'{where}: "model: {name}" needs a folder with open_clip_config.json; {config} is missing.')
    weights = _find_dir_checkpoint(folder)
    if weights is None:
        raise RaveError(f'{where}: folder {folder} has no weights file (*.safetensors, *.bin, *.pt, *.pth).')
    identity = {'type': 'open_clip', 'model': 'local-dir', 'config_sha256': file_sha256(config),
                'weights_sha256': file_sha256(weights)}
    return _Source(f'local-dir:{folder}', str(weights), None, identity, load_config_weights=False)


def _named_source(name: str, pretrained: Any, seed: int, cache_dir: Optional[str], where: str) -> _Source:
    """A model open_clip knows by name, with a pretrained tag, a weights file, or ``~`` (random init)."""
    import open_clip

    model_name = name.replace('/', '-')
    known = open_clip.list_models()
    if model_name not in known:
        raise RaveError(f'{where}: unknown open_clip model {name!r}. Close matches: '
                        f'{close_matches(model_name, known) or "none"} (open_clip.list_models() lists all).')
    base = model_name[:-len('-quickgelu')] if model_name.endswith('-quickgelu') else model_name
    identity: Dict[str, Any] = {'type': 'open_clip', 'model': base}
    if pretrained is None or pretrained is False:
        return _Source(model_name, None, None, dict(identity, pretrained=None, init_seed=seed))
    if not isinstance(pretrained, str):
        raise RaveError(f'{where}: option "pretrained" must be a tag, a weights file, or ~, got {pretrained!r}.')
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag_cfg:
        weights = _fetch_tag_weights(model_name, pretrained, cache_dir)
        identity['pretrained'] = pretrained.lower().replace('-', '_')
        return _Source(model_name, weights, bool(tag_cfg.get('quick_gelu', False)), identity)
    if os.path.isfile(pretrained):
        return _Source(model_name, pretrained, None, dict(identity, weights_sha256=file_sha256(pretrained)))
    if looks_like_path(pretrained):
        raise RaveError(f'{where}: weights file {pretrained!r} (option "pretrained") does not exist.')
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    raise RaveError(f'{where}: unknown pretrained tag {pretrained!r} for open_clip model {model_name!r}. '
                    + (f'Close matches: {close_matches(pretrained, tags) or "none"}; all tags: {tags}. '
                       if tags else 'This model has no pretrained tags; ')
                    + 'Give a tag, a path to a weights file, or ~ for random init.')


def build_open_clip_encoder(opt: Mapping[str, Any], where: str) -> FrozenImageEncoder:
    """A :class:`FrozenImageEncoder` around an open_clip CLIP model (text tower included)."""
    import open_clip

    register_test_configs()
    name = opt.get('model')
    if not isinstance(name, str) or not name:
        raise RaveError(f'{where}: option "model" must name an open_clip model (e.g. ViT-B-32), got {name!r}.')
    if name.startswith('hf-hub:'):
        raise RaveError(f'{where}: "model: {name}" is not supported; download the repository '
                        f'(huggingface-cli download {name[7:]} --local-dir FOLDER) and use "model: local-dir:FOLDER".')
    precision, seed = parse_precision(opt, where), parse_seed(opt, where)
    forced_quick_gelu = _quick_gelu_option(opt, where)
    source = (_local_dir_source(name, where) if name.startswith('local-dir:')
              else _named_source(name, opt.get('pretrained'), seed, opt.get('cache_dir'), where))
    create_kwargs: Dict[str, Any] = {'precision': precision}
    if not source.load_config_weights:
        create_kwargs['load_weights'] = False
    quick_gelu = source.quick_gelu if forced_quick_gelu is None else forced_quick_gelu
    if quick_gelu is not None:
        create_kwargs['force_quick_gelu'] = quick_gelu
    try:
        clip = build_seeded(seed, lambda: open_clip.create_model(source.model_name, pretrained=None, **create_kwargs))
    except (RuntimeError, ValueError, FileNotFoundError, KeyError, TypeError) as exc:
        raise RaveError(f'{where}: open_clip cannot build model {name!r}: {exc}') from None
    if source.weights_file is not None:
        load_checked(clip, source.weights_file, f'open_clip model {name!r}',
                     loader=lambda: open_clip.load_checkpoint(clip, source.weights_file, strict=True))
    embed_dim = int(clip.text_projection.shape[-1] if isinstance(getattr(clip, 'text_projection', None), torch.Tensor)
                    else clip.visual.output_dim)
    identity = dict(source.identity, embed_dim=embed_dim,
                    quick_gelu=any(isinstance(m, open_clip.transformer.QuickGELU) for m in clip.modules()))
    image_size = clip.visual.image_size
    size = int(image_size if isinstance(image_size, int) else image_size[0])
    preprocess = parse_preprocess(opt.get('preprocess'), default_size=size, where=f'{where}.preprocess')
    visual = clip.visual
    features_fn = None
    if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
        def features_fn(x):
            return visual.forward_intermediates(x, intermediates_only=True)['image_intermediates']
    tokenizer = open_clip.get_tokenizer(source.model_name) if hasattr(clip, 'token_embedding') else None
    return FrozenImageEncoder(clip, embed_dim=embed_dim, identity=identity, preprocess=preprocess,
                              precision=precision, image_fn=clip.encode_image, features_fn=features_fn,
                              tokenizer=tokenizer)
