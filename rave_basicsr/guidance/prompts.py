"""CLIP-LIT soft prompts: a learnable ``[2, 77, width]`` token-embedding tensor encoded by the text tower.

As in the CLIP-LIT code (``train.py``): both prompts start as the token embeddings of the tokenised "X X ... X"
(16 × "X"), the whole 77-position sequence is learnable, prompt 0 is the negative (backlit) and prompt 1 the
positive (well-lit) one. The encoding replaces open_clip's token lookup by the given embeddings: add the positional
embedding, run the causal transformer (open_clip 3.x runs it batch-first and transposes internally when a model is
not), final LayerNorm, then the projection at the end-of-text position taken from the tokenised init prompt.
"""
from typing import Union

import torch
from torch import nn

from rave_basicsr.utils.errors import RaveError

#: number of "X" placeholder tokens of the official prompt (``--length_prompt 16``)
DEFAULT_PROMPT_LENGTH = 16


def init_prompt_text(length: int = DEFAULT_PROMPT_LENGTH) -> str:
    """The official init prompt: ``"X " * length`` (the tokenizer drops the trailing space)."""
    if not isinstance(length, int) or length < 1:
        raise RaveError(f'prompt length must be a positive integer, got {length!r}.')
    return 'X ' * length


def init_eot_index(encoder, length: int = DEFAULT_PROMPT_LENGTH) -> int:
    """Position of the end-of-text token in the tokenised init prompt (17 for 16 × "X")."""
    tokens = encoder.tokenize([init_prompt_text(length)])
    return int(tokens.argmax(dim=-1)[0])


def init_soft_prompts(encoder, num_prompts: int = 2, length: int = DEFAULT_PROMPT_LENGTH) -> torch.Tensor:
    """``[num_prompts, context_length, width]`` float32 token embeddings of the init prompt (a fresh tensor).

    The model wraps the result in ``nn.Parameter``; the two prompts start identical, as in the CLIP-LIT code.
    """
    tokens = encoder.tokenize([init_prompt_text(length)] * num_prompts)
    with torch.no_grad():
        return encoder.token_embedding(tokens).detach().clone()


def encode_token_embeddings(clip_model: nn.Module, embeddings: torch.Tensor,
                            eot_index: Union[int, torch.Tensor]) -> torch.Tensor:
    """Token embeddings ``[N, L, width]`` -> text features ``[N, D]`` (float32, unnormalised), differentiable.

    ``eot_index`` is one position for all rows or an ``[N]`` tensor of positions.
    """
    if embeddings.dim() != 3:
        raise RaveError(f'soft prompts must be a [N, context_length, width] tensor, got {list(embeddings.shape)}.')
    expected = tuple(clip_model.positional_embedding.shape)
    if tuple(embeddings.shape[1:]) != expected:
        raise RaveError(f'soft prompts have shape {list(embeddings.shape)}, but this text tower expects '
                        f'[N, {expected[0]}, {expected[1]}] (context length, width). They were made for another '
                        'encoder; re-initialise them or use the encoder they were trained with.')
    cast_dtype = clip_model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + clip_model.positional_embedding.to(cast_dtype)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask)
    x = clip_model.ln_final(x)
    rows = torch.arange(x.shape[0], device=x.device)
    if isinstance(eot_index, torch.Tensor):
        eot_index = eot_index.to(x.device)
    x = x[rows, eot_index]
    projection = clip_model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return x.float()
