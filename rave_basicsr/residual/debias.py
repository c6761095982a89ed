"""Removing dataset biases (RAVE code, ``train_rave.py``) and user-named concepts from a residual vector.

*Shifted residual* (the originals' ``rave_unpaired_shifted``): rank the vocabulary by cosine with the residual, take
the ``top`` highest and ``bottom`` lowest entries, form the score-weighted means of their (unnormalised) text
embeddings ``a`` and ``b``, ``u = normalize(normalize(a) + normalize(b))``, and remove the component of the residual
along ``u``. The originals hard-code 15 tokens per side (their ``scores[:15]`` is a NameError, read as
``token_scores[:15]``); here both counts are options, and one side may be 0 (then ``u`` is the other side's mean).

*Concept removal*: the normalised text embeddings of user-given texts are orthonormalised (Gram-Schmidt) and their
span is projected out of the residual, so the new residual is orthogonal to every concept.

Either way the threshold is recomputed as ``<v_well_lit, v_residual'>`` and the step is appended to the history, so
the result is a :class:`ResidualVector` that trains RAVE directly.
"""
from typing import Any, Dict, List, Optional, Sequence

import torch

from rave_basicsr.residual.interpret import (check_count, encode_prompts, extremes, load_vocabulary,
                                              require_text_tower, score_vocabulary)
from rave_basicsr.residual.vector import ResidualVector
from rave_basicsr.utils.errors import RaveError

#: tokens per side in the originals' shifted residual
DEFAULT_REMOVE_TOKENS = 15


def _unit(vector: torch.Tensor, what: str) -> torch.Tensor:
    norm = vector.norm()
    if float(norm) < 1e-12:
        raise RaveError(f'{what} is a zero vector; nothing defines the direction to remove.')
    return vector / norm


def _weighted_direction(embeddings: torch.Tensor, scores: torch.Tensor, what: str) -> torch.Tensor:
    return _unit((embeddings.double() * scores[:, None]).mean(dim=0), what)


def remove_direction(residual: torch.Tensor, directions: Sequence[torch.Tensor]) -> torch.Tensor:
    """The residual minus its projection onto the span of ``directions`` (Gram-Schmidt, float64), unnormalised."""
    basis: List[torch.Tensor] = []
    for direction in directions:
        d = direction.double()
        for q in basis:  # modified Gram-Schmidt, twice for numerical orthogonality
            d = d - (d @ q) * q
        for q in basis:
            d = d - (d @ q) * q
        if float(d.norm()) > 1e-9 * max(1.0, float(direction.double().norm())):
            basis.append(d / d.norm())
    out = residual.double()
    for q in basis:
        out = out - (out @ q) * q
    return out


def _report(old: ResidualVector, new: ResidualVector) -> Dict[str, float]:
    return {'cosine_to_previous': float(old.residual.double() @ new.residual.double()),
            'previous_threshold': old.threshold, 'threshold': new.threshold}


def shift_residual(vector: ResidualVector, encoder: Any, remove_top: int = DEFAULT_REMOVE_TOKENS,
                   remove_bottom: int = DEFAULT_REMOVE_TOKENS, vocab: str = 'clip', limit: Optional[int] = None,
                   progress: bool = True) -> ResidualVector:
    """The originals' shifted residual with ``remove_top`` / ``remove_bottom`` vocabulary entries (see module doc)."""
    vector.check_encoder(encoder)
    require_text_tower(encoder, 'debiasing by tokens (--remove-top/--remove-bottom)')
    vocabulary = load_vocabulary(encoder, vocab, limit=limit, progress=progress)
    check_count(remove_top, vocabulary, '--remove-top')
    check_count(remove_bottom, vocabulary, '--remove-bottom')
    if remove_top + remove_bottom == 0:
        raise RaveError('--remove-top and --remove-bottom are both 0: nothing to remove.')
    scores = score_vocabulary(vector.residual, vocabulary)
    top, bottom = extremes(scores, remove_top, remove_bottom)
    parts = []
    if top:
        parts.append(_weighted_direction(vocabulary.embeddings[top], scores[top], 'the top tokens\' mean'))
    if bottom:
        parts.append(_weighted_direction(vocabulary.embeddings[bottom], scores[bottom], 'the bottom tokens\' mean'))
    u = _unit(sum(parts), 'the combined token direction')
    step = {'step': 'remove_tokens', 'vocabulary': vocabulary.source, 'remove_top': remove_top,
            'remove_bottom': remove_bottom,
            'top': [[vocabulary.texts[i], float(scores[i])] for i in top],
            'bottom': [[vocabulary.texts[i], float(scores[i])] for i in bottom]}
    new = vector.with_direction(remove_direction(vector.residual, [u]), step)
    new.history[-1].update(_report(vector, new))
    return new


def remove_concepts(vector: ResidualVector, encoder: Any, concepts: Sequence[str]) -> ResidualVector:
    """Project the text embeddings of ``concepts`` out of the residual (orthogonal to each afterwards)."""
    vector.check_encoder(encoder)
    require_text_tower(encoder, 'removing text concepts (--remove-concept)')
    concepts = [c.strip() for c in concepts]
    if not concepts or any(not c for c in concepts):
        raise RaveError('--remove-concept needs non-empty texts, e.g. --remove-concept "indoor" "people".')
    embeddings = encode_prompts(encoder, concepts).double()
    directions = [_unit(e, f'the text embedding of {c!r}') for e, c in zip(embeddings, concepts)]
    step = {'step': 'remove_concepts', 'concepts': list(concepts),
            'concept_cosines': [float(d @ vector.residual.double()) for d in directions]}
    new = vector.with_direction(remove_direction(vector.residual, directions), step)
    new.history[-1].update(_report(vector, new))
    return new


def check_debias_options(remove_top: Optional[int], remove_bottom: Optional[int],
                         concepts: Optional[Sequence[str]]) -> str:
    """``'tokens'`` or ``'concepts'``; a RaveError unless exactly one kind of removal is asked for."""
    by_tokens = remove_top is not None or remove_bottom is not None
    if by_tokens == bool(concepts):
        raise RaveError('give either --remove-top/--remove-bottom K (the originals\' shifted residual) or '
                        '--remove-concept TEXT ..., not both and not neither.')
    return 'tokens' if by_tokens else 'concepts'


def debias_residual(vector: ResidualVector, encoder: Any, remove_top: Optional[int] = None,
                    remove_bottom: Optional[int] = None, concepts: Optional[Sequence[str]] = None,
                    vocab: str = 'clip', limit: Optional[int] = None, progress: bool = True) -> ResidualVector:
    """One entry point for both kinds: token counts (a side not given is 0) or ``concepts``, not both."""
    if check_debias_options(remove_top, remove_bottom, concepts) == 'tokens':
        return shift_residual(vector, encoder, remove_top=remove_top or 0, remove_bottom=remove_bottom or 0,
                              vocab=vocab, limit=limit, progress=progress)
    return remove_concepts(vector, encoder, concepts)
