"""Encoders from BasicSR's ``ARCH_REGISTRY``: any registered module that maps ``[B, 3, H, W]`` images in [0, 1] to
``[B, D]`` embeddings (for example the CLIP-free :class:`~rave_basicsr.archs.image_stats_encoder_arch.ImageStatsEncoder`);
image-only, with the timm convention ``forward_intermediates`` for feature maps where the module has it.
"""
from copy import deepcopy
from typing import Any, Dict, Mapping

from rave_basicsr.guidance.encoder_loading import (build_seeded, close_matches, load_checked, parse_precision,
                                                   parse_seed, probe_embed_dim)
from rave_basicsr.guidance.frozen_encoder import PRECISIONS, FrozenImageEncoder
from rave_basicsr.guidance.preprocess import parse_preprocess
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.file_io import file_sha256


def build_arch_encoder(opt: Mapping[str, Any], where: str) -> FrozenImageEncoder:
    """A :class:`FrozenImageEncoder` around any ``ARCH_REGISTRY`` module that maps images to ``[B, D]``."""
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
                        f'{close_matches(arch_type, list(ARCH_REGISTRY.keys())) or "none"}.') from None
    pretrained = opt.get('pretrained')
    precision = parse_precision(opt, where)
    seed = parse_seed(opt, where)
    try:
        net = build_seeded(seed, lambda: arch_class(**net_opt))
    except TypeError as exc:
        raise RaveError(f'{where}: network {arch_type!r} rejects options {net_opt}: {exc}') from None
    identity: Dict[str, Any] = {'type': 'arch', 'network': {'type': arch_type, **dict(sorted(net_opt.items()))}}
    if pretrained not in (None, False):
        if not isinstance(pretrained, str):
            raise RaveError(f'{where}: option "pretrained" must be ~ or a weights file, got {pretrained!r}.')
        load_checked(net, pretrained, f'network {arch_type!r}')
        identity['weights_sha256'] = file_sha256(pretrained)
    elif any(True for _ in net.parameters()):
        identity['init_seed'] = seed
    preprocess = None
    if opt.get('preprocess') is not None:
        preprocess = parse_preprocess(opt['preprocess'], where=f'{where}.preprocess')
    net = net.to(PRECISIONS[precision])
    embed_dim = probe_embed_dim(net, preprocess.size if preprocess else 64, PRECISIONS[precision], where)
    identity['embed_dim'] = embed_dim
    features_fn = None
    if hasattr(net, 'forward_intermediates'):  # the timm convention: a list of feature maps
        def features_fn(x):
            return net.forward_intermediates(x, intermediates_only=True)
    return FrozenImageEncoder(net, embed_dim=embed_dim, identity=identity, preprocess=preprocess,
                              precision=precision, image_fn=net, features_fn=features_fn)
