"""The frozen image encoder behind every guidance and identity loss, whatever its source.

:class:`FrozenImageEncoder` keeps its network *outside* ``nn.Module``'s registries: an owner that stores it as an
attribute (even an ``nn.Module`` owner) never sees its weights in ``state_dict()``, ``parameters()`` or
``train()``, while ``.to()`` still moves it. The sources that build one (open_clip, timm, any ``ARCH_REGISTRY``
module) live in their own modules; :func:`rave_basicsr.guidance.encoders.build_image_encoder` picks one.
"""
import json
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from rave_basicsr.guidance.preprocess import PreprocessConfig, parse_preprocess, preprocess_images
from rave_basicsr.utils.errors import RaveError

PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


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
        """Learnable ``[N, context_length, width]`` token embeddings -> ``[N, embed_dim]`` (``guidance/prompts.py``)."""
        from rave_basicsr.guidance.prompts import encode_token_embeddings, init_eot_index

        self._require_text('encode_soft_prompts')
        if eot_index is None:
            eot_index = init_eot_index(self)
        return encode_token_embeddings(self._network, embeddings, eot_index)


def describe_identity(identity: Mapping[str, Any]) -> str:
    """Short human-readable form of an encoder identity for messages."""
    return json.dumps(dict(identity), sort_keys=True)


#: what to do about an image-only encoder where training needs text (the default hint of require_text_tower)
TRAINING_TEXT_HINT = ('Use an open_clip CLIP model (type: open_clip, e.g. model: ViT-B-32, pretrained: openai), or a '
                      'method that works with image-only encoders: RAVE or CLIP-LIT-Latent (guidance: latent).')


def require_text_tower(encoder: FrozenImageEncoder, purpose: str, hint: str = TRAINING_TEXT_HINT) -> None:
    """Raise a clear RaveError when ``purpose`` (e.g. 'CLIP-LIT text prompts') gets an image-only encoder."""
    if not getattr(encoder, 'has_text_tower', False):
        raise RaveError(f'{purpose} needs an encoder with a text tower, but the configured encoder '
                        f'{describe_identity(encoder.identity)} is image-only. {hint}')


def check_embedding_size(encoder: FrozenImageEncoder, size: int, what: str) -> None:
    """Raise a clear RaveError when ``what`` (a stored residual, a latent pair) has another embedding size."""
    if int(size) != encoder.embed_dim:
        raise RaveError(f'{what} has {int(size)}-dimensional embeddings, but the guidance encoder '
                        f'{describe_identity(encoder.identity)} produces {encoder.embed_dim}-dimensional ones. '
                        'Use the encoder it was computed with, or recompute it with this encoder.')
