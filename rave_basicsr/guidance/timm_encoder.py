"""timm encoders: any timm image model, randomly initialised (seeded) or from a local weights file; image-only.

``embedding: pooled`` (default) takes the features before the classifier, ``head`` the classifier output; models with
``forward_intermediates`` also give the feature maps the identity loss needs.
"""
import os
from typing import Any, Dict, Mapping

from rave_basicsr.guidance.encoder_loading import (build_seeded, close_matches, load_checked, parse_precision,
                                                   parse_seed, probe_embed_dim)
from rave_basicsr.guidance.frozen_encoder import PRECISIONS, FrozenImageEncoder
from rave_basicsr.guidance.preprocess import parse_preprocess
from rave_basicsr.utils.checkpoint import read_state_dict
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.file_io import file_sha256


def build_timm_encoder(opt: Mapping[str, Any], where: str) -> FrozenImageEncoder:
    """A :class:`FrozenImageEncoder` around a timm model: random init or a local weights file (no hub downloads)."""
    import timm

    name = opt.get('model')
    if not isinstance(name, str) or not timm.is_model(name):
        known = timm.list_models()
        raise RaveError(f'{where}: unknown timm model {name!r}. Close matches: '
                        f'{close_matches(str(name), known) or "none"} (timm.list_models() lists all).')
    pretrained = opt.get('pretrained')
    precision = parse_precision(opt, where)
    seed = parse_seed(opt, where)
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
        net = build_seeded(seed, lambda: timm.create_model(name, pretrained=False, **kwargs))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RaveError(f'{where}: timm cannot build {name!r} with model_kwargs {kwargs}: {exc}') from None
    if pretrained:
        state = read_state_dict(pretrained)
        if embedding == 'pooled':
            head = net.pretrained_cfg.get('classifier')
            heads = [head] if isinstance(head, str) else list(head or [])
            state = {k: v for k, v in state.items() if not any(k.startswith(h + '.') for h in heads)}
        load_checked(net, pretrained, f'timm model {name!r}', loader=lambda: net.load_state_dict(state, strict=True))
    data_cfg = timm.data.resolve_model_data_config(net)
    preprocess = parse_preprocess(opt.get('preprocess'), default_size=int(data_cfg['input_size'][-1]),
                                  default_mean=data_cfg['mean'], default_std=data_cfg['std'],
                                  where=f'{where}.preprocess')
    net = net.to(PRECISIONS[precision])
    features_fn = None
    if hasattr(net, 'forward_intermediates'):
        def features_fn(x):
            return net.forward_intermediates(x, intermediates_only=True)
    embed_dim = probe_embed_dim(net, preprocess.size, PRECISIONS[precision], where)
    identity['embed_dim'] = embed_dim
    return FrozenImageEncoder(net, embed_dim=embed_dim, identity=identity, preprocess=preprocess,
                              precision=precision, image_fn=net, features_fn=features_fn)
