"""Reading a residual vector through the text tower: which words it points to (RAVE code, ``train_rave.py``).

The vocabulary is ranked as the RAVE code does it: every token id ``i`` of the tokenizer is decoded to a string,
that string is tokenised again as a whole prompt (``[SOT] tokens [EOT]``) and encoded by the text tower
(unnormalised ``encode_text`` output); ``score = cos(text_embedding, residual)``. The originals keep the embeddings
in a dict keyed by the decoded string, so identical strings collapse (first position kept, as a Python dict does);
strings that differ only by the end-of-word marker (``"sun"`` vs ``"sun "``) stay separate entries, as there.

Speed: a one-token prompt occupies only its first few positions, and the CLIP text transformer is causal, so the
end-of-text output depends on those positions only. Prompts are therefore encoded over the shortest prefix that
holds their end-of-text token, which is mathematically identical to the full 77-position ``encode_text`` (a test
checks it) and several times faster. The vocabulary's embeddings are cached on disk once per encoder identity
(``$RAVE_CACHE_DIR/vocab`` or ``~/.cache/rave_basicsr/vocab``).
"""
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from rave_basicsr.guidance.frozen_encoder import require_text_tower as require_encoder_text_tower
from rave_basicsr.residual.vector import ResidualVector, canonical_identity
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.file_io import rave_cache_dir

logger = logging.getLogger('rave_basicsr')

#: bump when the way vocabulary embeddings are computed changes (invalidates caches)
VOCAB_CACHE_VERSION = 1
PROMPT_BATCH_SIZE = 2048


@dataclass
class Vocabulary:
    """Texts and their unnormalised text-tower embeddings ``[len(texts), D]`` (duplicates collapsed)."""
    texts: List[str]
    embeddings: torch.Tensor
    source: str


#: what to do about an image-only encoder where words are needed
WORDS_HINT = ('Computing a residual and training RAVE work with image-only encoders; to read a residual through words, '
              'compute it with an open_clip CLIP model (--encoder open_clip:ViT-B-32:openai).')


def require_text_tower(encoder: Any, purpose: str) -> None:
    """RaveError when ``encoder`` has no text tower: words can only be read with a CLIP-like model."""
    require_encoder_text_tower(encoder, purpose, WORDS_HINT)


def cache_dir() -> Path:
    """Where vocabulary embeddings are cached: ``$RAVE_CACHE_DIR/vocab``, else ``~/.cache/rave_basicsr/vocab``."""
    return rave_cache_dir() / 'vocab'


def _can_truncate(network: nn.Module) -> bool:
    """True for open_clip CLIP text towers with a causal mask and end-of-text pooling (prefix encoding is exact)."""
    return (getattr(network, 'attn_mask', None) is not None and hasattr(network, 'token_embedding')
            and getattr(network, 'text_pool_type', None) == 'argmax')


def _encode_token_prefix(network: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``encode_text`` over the shortest prefix that holds every row's end-of-text token (exact when causal)."""
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    cast_dtype = network.transformer.get_cast_dtype()
    x = network.token_embedding(tokens[:, :length]).to(cast_dtype)
    x = x + network.positional_embedding[:length].to(cast_dtype)
    x = network.transformer(x, attn_mask=network.attn_mask[:length, :length])
    x = network.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    projection = network.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return x.float()


def encode_prompts(encoder: Any, texts: Sequence[str], batch_size: int = PROMPT_BATCH_SIZE,
                   progress: bool = False) -> torch.Tensor:
    """``[N, D]`` unnormalised text embeddings of ``texts``, each tokenised as a whole prompt; batched."""
    require_text_tower(encoder, 'reading a residual through words')
    network = encoder.network
    rows = []
    with torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc='encoding texts', unit='batch',
                          disable=not progress, leave=False):
            tokens = encoder.tokenize(list(texts[start:start + batch_size]))
            rows.append(_encode_token_prefix(network, tokens) if _can_truncate(network)
                        else encoder.encode_text(tokens))
    return torch.cat(rows).cpu() if rows else torch.zeros(0, encoder.embed_dim)


def decode_vocabulary(encoder: Any, limit: Optional[int] = None) -> List[str]:
    """Every token id decoded to its string (the first ``limit`` ids when given), as the RAVE code does."""
    require_text_tower(encoder, 'ranking the vocabulary')
    tokenizer = encoder.tokenizer
    if not hasattr(tokenizer, 'decode') or not hasattr(tokenizer, 'encoder'):
        raise RaveError(f'the tokenizer of encoder {canonical_identity(encoder.identity)} '
                        f'({type(tokenizer).__name__}) cannot list its vocabulary; use a word list (--vocab FILE).')
    size = int(encoder.network.token_embedding.num_embeddings)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise RaveError(f'vocabulary limit must be a positive integer, got {limit!r}.')
        size = min(size, limit)
    return [tokenizer.decode([i]) for i in range(size)]


def _cache_path(encoder: Any, limit: Optional[int]) -> Path:
    key = json.dumps({'identity': json.loads(canonical_identity(encoder.identity)), 'limit': limit,
                      'tokenizer': type(encoder.tokenizer).__name__, 'version': VOCAB_CACHE_VERSION},
                     sort_keys=True)
    return cache_dir() / f'{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors'


def _read_cache(path: Path, encoder: Any, count: int) -> Optional[Tuple[List[str], torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework='pt', device='cpu') as handle:
            meta = handle.metadata() or {}
            embeddings = handle.get_tensor('embeddings')
        texts = json.loads(meta['texts'])
        if meta.get('identity') != canonical_identity(encoder.identity) or len(texts) != count \
                or tuple(embeddings.shape) != (count, encoder.embed_dim):
            raise ValueError('the cache does not match this encoder')
        return texts, embeddings
    except Exception as exc:  # a damaged or foreign cache file is recomputed, never trusted
        logger.warning('vocabulary cache %s is unusable (%s); recomputing it.', path, exc)
        return None


def _write_cache(path: Path, encoder: Any, texts: List[str], embeddings: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=str(path.parent))
    os.close(handle)
    try:
        save_file({'embeddings': embeddings.contiguous()}, temporary,
                  metadata={'identity': canonical_identity(encoder.identity), 'texts': json.dumps(texts)})
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def collapse_duplicates(texts: Sequence[str], embeddings: torch.Tensor) -> Tuple[List[str], torch.Tensor]:
    """Keep one entry per distinct string, at its first position (the originals' dict keyed by string)."""
    first: Dict[str, int] = {}
    for index, text in enumerate(texts):
        first.setdefault(text, index)
    keep = list(first.values())
    return [texts[i] for i in keep], embeddings[keep]


def clip_vocabulary(encoder: Any, limit: Optional[int] = None, use_cache: bool = True,
                    progress: bool = True) -> Vocabulary:
    """The tokenizer's whole vocabulary (or its first ``limit`` ids) with text embeddings, cached on disk."""
    texts = decode_vocabulary(encoder, limit)
    path = _cache_path(encoder, limit)
    cached = _read_cache(path, encoder, len(texts)) if use_cache and path.is_file() else None
    if cached is not None and cached[0] == texts:
        embeddings = cached[1]
    else:
        embeddings = encode_prompts(encoder, texts, progress=progress)
        if use_cache:
            _write_cache(path, encoder, texts, embeddings)
    unique, embeddings = collapse_duplicates(texts, embeddings)
    return Vocabulary(unique, embeddings, 'clip' if limit is None else f'clip[:{limit}]')


def read_word_list(path: str) -> List[str]:
    """Words or phrases from a text file, one a line; blank lines and lines starting with ``#`` are ignored."""
    if not os.path.isfile(path):
        raise RaveError(f'word list {path!r} does not exist (give --vocab clip or a text file, one word a line).')
    try:
        with open(path, encoding='utf-8') as handle:
            words = [line.strip() for line in handle]
    except UnicodeDecodeError:
        raise RaveError(f'word list {path!r} is not UTF-8 text.') from None
    words = [w for w in words if w and not w.startswith('#')]
    if not words:
        raise RaveError(f'word list {path!r} has no words (one word or phrase a line).')
    return words


def load_vocabulary(encoder: Any, vocab: str = 'clip', limit: Optional[int] = None,
                    progress: bool = True) -> Vocabulary:
    """``vocab='clip'``: the tokenizer's vocabulary; otherwise a word-list file path."""
    require_text_tower(encoder, 'ranking words against a residual (interpret, debias)')
    if vocab == 'clip':
        return clip_vocabulary(encoder, limit=limit, progress=progress)
    words = read_word_list(vocab)
    if limit is not None:
        words = words[:limit]
    texts, embeddings = collapse_duplicates(words, encode_prompts(encoder, words, progress=progress))
    return Vocabulary(texts, embeddings, os.fspath(vocab))


def score_vocabulary(residual: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
    """``cos(text_embedding, residual)`` for every entry, float64."""
    embeddings = vocabulary.embeddings.double()
    direction = residual.double() / residual.double().norm()
    return (embeddings / embeddings.norm(dim=1, keepdim=True)) @ direction


def extremes(scores: torch.Tensor, top: int, bottom: int) -> Tuple[List[int], List[int]]:
    """Indices of the ``top`` highest scores (best first) and the ``bottom`` lowest (lowest first); stable ties."""
    order = sorted(range(len(scores)), key=lambda i: float(scores[i]))
    return order[::-1][:top] if top else [], order[:bottom]


def check_count(k: int, vocabulary: Vocabulary, option: str) -> None:
    """RaveError when ``k`` is not a count of entries the vocabulary can give."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise RaveError(f'{option} must be a non-negative integer, got {k!r}.')
    if k > len(vocabulary.texts):
        raise RaveError(f'{option} {k} is larger than the vocabulary ({len(vocabulary.texts)} distinct entries '
                        f'from {vocabulary.source}); choose at most {len(vocabulary.texts)}.')


def interpret_residual(vector: ResidualVector, encoder: Any, vocab: str = 'clip', top: int = 20,
                       limit: Optional[int] = None, progress: bool = True) -> Dict[str, Any]:
    """Rank a vocabulary by cosine with the residual; returns a JSON-serialisable summary with both ends."""
    vector.check_encoder(encoder)
    require_text_tower(encoder, 'rave residual interpret')
    vocabulary = load_vocabulary(encoder, vocab, limit=limit, progress=progress)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise RaveError(f'--top must be a positive integer, got {top!r}.')
    check_count(top, vocabulary, '--top')
    scores = score_vocabulary(vector.residual, vocabulary)
    best, worst = extremes(scores, top, top)
    return {
        'vocabulary': {'source': vocabulary.source, 'size': len(vocabulary.texts)},
        'threshold': vector.threshold, 'counts': vector.counts, 'encoder_identity': vector.encoder_identity,
        'history': [h.get('step') for h in vector.history],
        'top': [{'text': vocabulary.texts[i], 'score': float(scores[i])} for i in best],
        'bottom': [{'text': vocabulary.texts[i], 'score': float(scores[i])} for i in worst],
    }


def format_tables(summary: Dict[str, Any]) -> str:
    """The top and bottom tables as plain text."""
    lines = [f"vocabulary: {summary['vocabulary']['source']} ({summary['vocabulary']['size']} entries); "
             f"threshold {summary['threshold']:.4f}; images: {summary['counts']}"]
    for title, rows in (('most aligned with the residual (well-lit side)', summary['top']),
                        ('most anti-aligned (backlit side)', summary['bottom'])):
        lines += ['', title, f"{'rank':>4}  {'cosine':>8}  text"]
        lines += [f'{n:>4}  {row["score"]:>8.4f}  {row["text"]!r}' for n, row in enumerate(rows, 1)]
    return '\n'.join(lines)


def projection_2d(vector: ResidualVector) -> Dict[str, torch.Tensor]:
    """Per-image coordinates (residual direction, first principal component of the orthogonal complement).

    Needs stored embeddings. Returns ``{'well_lit': [N, 2], 'backlit': [M, 2], 'means': [2, 2]}`` (the two
    set means, well-lit first).
    """
    if vector.embeddings is None:
        raise RaveError('the residual file has no per-image embeddings; recompute it with --keep-embeddings to '
                        'plot the 2-D projection.')
    r = vector.residual.double()
    unit = {k: v.double() / v.double().norm(dim=1, keepdim=True) for k, v in vector.embeddings.items()}
    stacked = torch.cat([unit['well_lit'], unit['backlit']])
    complement = stacked - (stacked @ r)[:, None] * r[None]
    centred = complement - complement.mean(dim=0, keepdim=True)
    if stacked.shape[0] > 1 and float(centred.norm()) > 1e-12:
        axis = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    else:
        axis = torch.zeros_like(r)
    means = torch.stack([vector.well_lit_mean.double(), vector.backlit_mean.double()])
    coords = {k: torch.stack([v @ r, v @ axis], dim=1) for k, v in unit.items()}
    coords['means'] = torch.stack([means @ r, means @ axis], dim=1)
    return coords
