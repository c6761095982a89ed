"""Soft prompts: init from "X"×16, encoding through the text tower (as CLIP-LIT's ``train.py``)."""
import pytest
import torch

from rave_basicsr.guidance.encoders import build_image_encoder
from rave_basicsr.guidance.prompts import init_eot_index, init_prompt_text, init_soft_prompts
from rave_basicsr.utils.errors import RaveError


@pytest.fixture(scope='module')
def encoder():
    return build_image_encoder({'type': 'open_clip', 'model': 'rave-test-tiny-vit', 'pretrained': None})


def test_init_matches_spec(encoder):
    tokens = encoder.tokenize([init_prompt_text()])
    assert tokens[0, 0] == 49406 and tokens[0, 17] == 49407 and (tokens[0, 18:] == 0).all()
    assert init_eot_index(encoder) == 17
    prompts = init_soft_prompts(encoder)
    assert prompts.shape == (2, 77, 64) and not prompts.requires_grad
    assert torch.equal(prompts[0], prompts[1])
    assert torch.equal(prompts[0, 1], encoder.network.token_embedding.weight[tokens[0, 1]])


def test_real_token_embeddings_equal_encode_text(encoder):
    tokens = encoder.tokenize(['a photo of a backlit person', 'well-lit'])
    ours = encoder.encode_soft_prompts(encoder.token_embedding(tokens), tokens.argmax(dim=-1))
    assert torch.allclose(ours, encoder.encode_text(tokens), atol=1e-5)


def test_soft_prompt_gradients_reach_prompts_not_encoder(encoder):
    prompts = torch.nn.Parameter(init_soft_prompts(encoder))
    features = encoder.encode_soft_prompts(prompts)  # EOT from the tokenised init prompt
    assert features.shape == (2, 32)
    features.pow(2).sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.network.parameters())


def test_causal_mask_ignores_positions_after_eot(encoder):
    prompts = init_soft_prompts(encoder)
    changed = prompts.clone()
    changed[:, 18:] += 1.0
    assert torch.allclose(encoder.encode_soft_prompts(prompts), encoder.encode_soft_prompts(changed), atol=1e-6)


def test_soft_prompts_of_another_encoder(encoder):
    with pytest.raises(RaveError, match=r'expects \[N, 77, 64\]'):
        encoder.encode_soft_prompts(torch.zeros(2, 77, 512))
