"""``--encoder SPEC``: naming a guidance encoder on the command line.

A SPEC is either a YAML/JSON file holding an encoder option block (the block ``build_image_encoder`` takes, see
docs/architecture.md), or a compact form:

=====================================  ==============================================================================
``open_clip:MODEL``                    open_clip model with OpenAI weights (``rave-test-*`` test configs: random init)
``open_clip:MODEL:TAG``                a pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...), a weights file, or
                                       ``random`` for a seeded random init
``timm:MODEL`` / ``timm:MODEL:FILE``   a timm model, random init or a local weights file
``arch:TYPE``                          an ``ARCH_REGISTRY`` module mapping images to embeddings (``ImageStatsEncoder``)
=====================================  ==============================================================================
"""
import os
from typing import Any, Dict, Optional

from rave_basicsr.guidance.encoders import build_image_encoder
from rave_basicsr.guidance.frozen_encoder import FrozenImageEncoder
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.options import close_matches_hint, load_option_file

KINDS = ('open_clip', 'timm', 'arch')
RANDOM_INIT = ('random', 'none', '~')
TEST_PREFIX = 'rave-test-'
EXAMPLES = 'open_clip:ViT-B-32:openai, open_clip:rave-test-tiny-vit, timm:resnet18, arch:ImageStatsEncoder, ' \
           'or a .yml/.json file with an encoder option block'


def parse_encoder_spec(spec: str) -> Dict[str, Any]:
    """The ``build_image_encoder`` option block for a SPEC (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RaveError(f'--encoder needs a value, e.g. {EXAMPLES}.')
    spec = spec.strip()
    if spec.lower().endswith(('.yml', '.yaml', '.json')) or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise RaveError(f'--encoder {spec}: option file not found.')
        block = dict(load_option_file(spec))
        if 'type' not in block:
            raise RaveError(f'--encoder {spec}: the file must hold one encoder option block with a "type" '
                            f'({", ".join(KINDS)}), e.g. "type: open_clip, model: ViT-B-32, pretrained: openai".')
        return block
    kind, _, rest = spec.partition(':')
    if kind not in KINDS or not rest:
        hint = close_matches_hint(kind, KINDS)
        raise RaveError(f'--encoder {spec!r} is neither an existing option file nor KIND:NAME with KIND one of '
                        f'{list(KINDS)}. Examples: {EXAMPLES}{hint}')
    name, _, weights = rest.partition(':')
    if kind == 'arch':
        if weights:
            raise RaveError(f'--encoder {spec!r}: arch encoders take no weights in the compact form; use an option '
                            'file with "pretrained: FILE".')
        return {'type': 'arch', 'network': {'type': name}}
    if weights.lower() in RANDOM_INIT:
        pretrained = None
    elif weights:
        pretrained = weights
    elif kind == 'open_clip' and not name.startswith(TEST_PREFIX):
        pretrained = 'openai'
    else:
        pretrained = None
    return {'type': kind, 'model': name, 'pretrained': pretrained}


def build_encoder_from_spec(spec: str) -> FrozenImageEncoder:
    """A frozen guidance encoder for a SPEC; unknown models fail with close matches."""
    return build_image_encoder(parse_encoder_spec(spec), role='guidance', where=f'--encoder {spec}')


def encoder_options_from_identity(identity: Dict[str, Any]) -> Dict[str, Any]:
    """The option block that rebuilds the encoder a residual file names, when the identity alone suffices.

    Works for open_clip tags and seeded random inits, timm random inits and ``arch`` encoders; encoders loaded
    from a local weights file are identified by its hash only, so their file must be given with ``--encoder``.
    """
    kind = identity.get('type')
    if 'weights_sha256' in identity or kind not in KINDS:
        raise RaveError('this residual file was made with an encoder loaded from a local weights file (or of an '
                        'unknown kind); pass the same encoder with --encoder (an option file or KIND:NAME:FILE).')
    if kind == 'arch':
        return {'type': 'arch', 'network': dict(identity['network'])}
    block: Dict[str, Any] = {'type': kind, 'model': identity['model'], 'pretrained': identity.get('pretrained')}
    if block['pretrained'] is None:
        block['seed'] = identity.get('init_seed', 0)
    if kind == 'open_clip':
        block['quick_gelu'] = identity.get('quick_gelu')
    else:
        block.update(embedding=identity.get('embedding', 'pooled'), model_kwargs=identity.get('model_kwargs') or {})
        block['model_kwargs'].pop('num_classes', None)
    return block


def build_encoder_for_residual(spec: Optional[str], identity: Dict[str, Any]) -> FrozenImageEncoder:
    """The encoder given by ``--encoder SPEC``, or, without one, the encoder the residual file names."""
    if spec:
        return build_encoder_from_spec(spec)
    return build_image_encoder(encoder_options_from_identity(identity), role='guidance',
                               where='the encoder recorded in the residual file')
