"""Residual-vector toolkit: the formula, the file format, computation from image sets, interpretation, debiasing."""
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rave_basicsr.residual.compute import compute_residual, residual_from_embeddings
from rave_basicsr.residual.vector import ResidualVector
from rave_basicsr.utils.errors import RaveError
from tests.residual_helpers import STATS, TINY_VIT, TINY_VIT_OTHER_SEED, make_sets

pytestmark = pytest.mark.usefixtures('vocab_cache')  # the vocabulary cache never goes to ~/.cache


def _unit(values):
    v = np.asarray(values, dtype=np.float64)
    return v / np.linalg.norm(v)


def _vector(dim=4, seed=0, identity=None, embeddings=False):
    gen = torch.Generator().manual_seed(seed)
    well, back = torch.randn(5, dim, generator=gen) + 1.0, torch.randn(3, dim, generator=gen)
    residual, threshold, v_well, v_back = residual_from_embeddings(well, back)
    return ResidualVector(residual=residual, threshold=threshold, well_lit_mean=v_well, backlit_mean=v_back,
                          counts={'well_lit': 5, 'backlit': 3}, encoder_identity=identity or {'type': 'test'},
                          preprocess={'size': 8},
                          embeddings={'well_lit': well, 'backlit': back} if embeddings else None,
                          history=[{'step': 'compute'}])


# ------------------------------------------------------------------------------------------------ the formula
def test_formula_matches_hand_computation():
    well = [[3.0, 4.0, 0.0], [0.0, 2.0, 0.0]]
    back = [[1.0, 0.0, 0.0], [0.0, 0.0, 5.0], [2.0, 0.0, 2.0]]
    # by hand: normalise each row, average, re-normalise; residual = normalise(difference)
    v_well = _unit(np.mean([_unit(r) for r in well], axis=0))   # mean of (0.6, 0.8, 0) and (0, 1, 0) = (0.3, 0.9, 0)
    v_back = _unit(np.mean([_unit(r) for r in back], axis=0))
    np.testing.assert_allclose(v_well, np.array([0.3, 0.9, 0.0]) / math.sqrt(0.9), atol=1e-12)
    expected_residual = _unit(v_well - v_back)
    residual, threshold, got_well, got_back = residual_from_embeddings(torch.tensor(well), torch.tensor(back))
    assert residual.dtype == torch.float32 and residual.shape == (3,)
    np.testing.assert_allclose(got_well.numpy(), v_well, atol=1e-6)
    np.testing.assert_allclose(got_back.numpy(), v_back, atol=1e-6)
    np.testing.assert_allclose(residual.numpy(), expected_residual, atol=1e-6)
    assert threshold == pytest.approx(float(v_well @ expected_residual), abs=1e-6)
    # the scale of an embedding must not matter (it is normalised before averaging)
    scaled = torch.tensor(well) * torch.tensor([[10.0], [0.1]])
    np.testing.assert_allclose(residual_from_embeddings(scaled, torch.tensor(back))[0].numpy(), expected_residual,
                               atol=1e-6)


def test_formula_bad_inputs():
    with pytest.raises(RaveError, match=r'well-lit embeddings must be a non-empty \[N, D\] tensor, got \[0, 3\]'):
        residual_from_embeddings(torch.zeros(0, 3), torch.ones(2, 3))
    with pytest.raises(RaveError, match='well-lit embeddings have size 3 but backlit ones 4; both sets must be '
                                        'embedded by the same encoder'):
        residual_from_embeddings(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(RaveError, match=r'well-lit embeddings of rows \[0\] are zero vectors'):
        residual_from_embeddings(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.ones(2, 2))
    with pytest.raises(RaveError, match='the well-lit and backlit sets have the same mean embedding'):
        residual_from_embeddings(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]))
    with pytest.raises(RaveError, match='well-lit embeddings contain NaN or Inf values'):
        residual_from_embeddings(torch.tensor([[float('nan'), 0.0]]), torch.tensor([[2.0, 0.0]]))


# ------------------------------------------------------------------------------------------------ file format
def test_save_load_round_trip(tmp_path):
    vector = _vector(embeddings=True)
    path = tmp_path / 'r.safetensors'
    vector.save(path)
    loaded = ResidualVector.load(path)
    for key in ('residual', 'well_lit_mean', 'backlit_mean'):
        assert torch.equal(getattr(loaded, key), getattr(vector, key))
    assert loaded.threshold == vector.threshold
    assert loaded.counts == vector.counts and loaded.encoder_identity == vector.encoder_identity
    assert loaded.preprocess == vector.preprocess and loaded.history == vector.history
    assert torch.equal(loaded.embeddings['well_lit'], vector.embeddings['well_lit'])
    # the metadata is plain JSON in the safetensors header
    from safetensors import safe_open
    with safe_open(str(path), framework='pt') as handle:
        meta = handle.metadata()
    assert json.loads(meta['counts']) == {'well_lit': 5, 'backlit': 3}
    assert meta['format'] == 'rave_basicsr.residual_vector'


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / 'r.safetensors'
    path.write_bytes(b'user data')
    with pytest.raises(RaveError, match='already exists.*--overwrite'):
        _vector().save(path)
    assert path.read_bytes() == b'user data'
    _vector().save(path, overwrite=True)
    assert ResidualVector.load(path).counts['well_lit'] == 5


def test_a_save_that_fails_midway_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / 'r.safetensors'
    _vector(seed=1).save(path)
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, 'wb') as handle:
            handle.write(b'half a file')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(safetensors.torch, 'save_file', disk_full)
    with pytest.raises(OSError, match='No space left on device'):
        _vector(seed=2).save(path, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ['r.safetensors']  # the temporary file was removed


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(RaveError, match=f"residual file '{re.escape(str(tmp_path / 'missing.safetensors'))}' does "
                                        'not exist'):
        ResidualVector.load(tmp_path / 'missing.safetensors')
    junk = tmp_path / 'junk.safetensors'
    junk.write_bytes(b'\x00' * 40)
    with pytest.raises(RaveError, match=f"residual file '{re.escape(str(junk))}' cannot be read as safetensors"):
        ResidualVector.load(junk)
    from safetensors.torch import save_file
    other = tmp_path / 'other.safetensors'
    save_file({'residual': torch.ones(3)}, str(other))
    with pytest.raises(RaveError, match='other.safetensors\' is a safetensors file but not a rave_basicsr residual'):
        ResidualVector.load(other)
    # an inconsistent threshold (hand-edited header) is caught
    vector = _vector()
    vector.save(tmp_path / 'ok.safetensors')
    from safetensors import safe_open
    with safe_open(str(tmp_path / 'ok.safetensors'), framework='pt') as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    meta['threshold'] = json.dumps(vector.threshold + 0.1)
    save_file(tensors, str(tmp_path / 'edited.safetensors'), metadata=meta)
    with pytest.raises(RaveError, match=r'edited.safetensors\': "threshold" is [\d.]+, but <well_lit_mean, residual> '
                                        r'is [\d.]+; the file is inconsistent'):
        ResidualVector.load(tmp_path / 'edited.safetensors')
    tensors['residual'] = tensors['residual'] * 2
    save_file(tensors, str(tmp_path / 'norm.safetensors'), metadata=dict(meta, threshold=json.dumps(vector.threshold)))
    with pytest.raises(RaveError, match='norm.safetensors\': "residual" must have unit norm, but its norm is 2.000000'):
        ResidualVector.load(tmp_path / 'norm.safetensors')


def test_check_encoder():
    vector = _vector(identity={'type': 'open_clip', 'model': 'A', 'embed_dim': 4})
    vector.check_encoder(SimpleNamespace(embed_dim=4, identity={'model': 'A', 'type': 'open_clip', 'embed_dim': 4}))
    with pytest.raises(RaveError, match="another encoder.*model: file 'A' vs encoder 'B'"):
        vector.check_encoder(SimpleNamespace(embed_dim=4, identity={'type': 'open_clip', 'model': 'B', 'embed_dim': 4}))
    with pytest.raises(RaveError, match='4-dimensional.*8-dimensional'):
        vector.check_encoder(SimpleNamespace(embed_dim=8, identity={'type': 'open_clip', 'model': 'A'}))


# ------------------------------------------------------------------------------------------------ from images
@pytest.fixture(scope='module')
def tiny_vit():
    from rave_basicsr.guidance.encoders import build_image_encoder
    return build_image_encoder(TINY_VIT)


@pytest.fixture(scope='module')
def image_sets(tmp_path_factory):
    return make_sets(tmp_path_factory.mktemp('sets'))


def test_compute_matches_encoding_each_image(tiny_vit, image_sets):
    from rave_basicsr.guidance.preprocess import parse_preprocess
    from rave_basicsr.utils.image_io import read_image

    well, back = image_sets
    vector = compute_residual(tiny_vit, well, back, batch_size=3, keep_embeddings=True, progress=False)
    cfg = parse_preprocess({'resize': 'shorter_side_center_crop', 'interpolation': 'bicubic', 'antialias': True},
                           default_size=32)
    by_hand = {}
    for key, folder in (('well_lit', well), ('backlit', back)):
        rows = []
        for path in sorted(folder.iterdir()):
            image = torch.from_numpy(read_image(str(path)).rgb).permute(2, 0, 1)[None]
            with torch.no_grad():
                rows.append(tiny_vit.encode_image(image, preprocess=cfg)[0])
        by_hand[key] = torch.stack(rows)
        torch.testing.assert_close(vector.embeddings[key], by_hand[key], atol=1e-5, rtol=1e-5)
    # the formula by hand (normalise, average, normalise; residual = normalised difference)
    means = {key: _unit(np.mean([_unit(row) for row in rows.double().numpy()], axis=0))
             for key, rows in by_hand.items()}
    residual = _unit(means['well_lit'] - means['backlit'])
    np.testing.assert_allclose(vector.residual.numpy(), residual, atol=1e-5)
    assert vector.threshold == pytest.approx(float(means['well_lit'] @ residual), abs=1e-5)
    assert vector.mean_distance == pytest.approx(float(np.linalg.norm(means['well_lit'] - means['backlit'])), abs=1e-5)
    assert vector.counts == {'well_lit': 5, 'backlit': 4}
    assert vector.encoder_identity == tiny_vit.identity
    assert vector.preprocess == cfg.to_dict()
    assert vector.history[0]['step'] == 'compute' and vector.history[0]['skipped'] == {'well_lit': [], 'backlit': []}
    vector.check_encoder(tiny_vit)


def test_compute_is_deterministic(tiny_vit, image_sets, tmp_path):
    well, back = image_sets
    first = compute_residual(tiny_vit, well, back, batch_size=2, progress=False)
    second = compute_residual(tiny_vit, well, back, batch_size=2, num_workers=2, progress=False)
    assert torch.equal(first.residual, second.residual) and first.threshold == second.threshold
    first.save(tmp_path / 'a.safetensors')
    second.save(tmp_path / 'b.safetensors')
    a, b = ResidualVector.load(tmp_path / 'a.safetensors'), ResidualVector.load(tmp_path / 'b.safetensors')
    assert torch.equal(a.residual, b.residual) and torch.equal(a.well_lit_mean, b.well_lit_mean)
    assert (a.threshold, a.counts, a.history, a.preprocess) == (b.threshold, b.counts, b.history, b.preprocess)


def test_corrupt_files_skipped_and_reported(tiny_vit, image_sets, tmp_path, caplog):
    well, back = image_sets
    damaged = tmp_path / 'back'
    damaged.mkdir()
    for path in back.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    (damaged / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    (damaged / 'empty.jpg').write_bytes(b'')
    vector = compute_residual(tiny_vit, well, damaged, progress=False)
    clean = compute_residual(tiny_vit, well, back, progress=False)
    assert vector.counts == {'well_lit': 5, 'backlit': 4}
    torch.testing.assert_close(vector.residual, clean.residual, atol=1e-6, rtol=0)
    skipped = vector.history[0]['skipped']['backlit']
    assert len(skipped) == 2 and any('broken.png' in s for s in skipped) and any('empty.jpg' in s for s in skipped)
    assert '2 of 6 backlit images skipped' in caplog.text and 'broken.png' in caplog.text
    with pytest.raises(RaveError, match='broken.png.*strict'):
        compute_residual(tiny_vit, well, damaged, strict=True, progress=False)


def test_compute_bad_folders(tiny_vit, image_sets, tmp_path):
    well, _ = image_sets
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'texts').mkdir()
    (tmp_path / 'texts' / 'notes.txt').write_text('no images here')
    for folder, message in (('empty', 'the folder is empty'), ('texts', 'the folder has no image files')):
        with pytest.raises(RaveError, match=f'^{re.escape(str(tmp_path / folder))}: {message}'):
            compute_residual(tiny_vit, well, tmp_path / folder, progress=False)
    with pytest.raises(RaveError, match=f'^{re.escape(str(tmp_path / "missing"))}: image folder not found'):
        compute_residual(tiny_vit, tmp_path / 'missing', well, progress=False)
    (tmp_path / 'allbad').mkdir()
    (tmp_path / 'allbad' / 'x.png').write_bytes(b'junk')
    with pytest.raises(RaveError, match='none of the 1 images'):
        compute_residual(tiny_vit, well, tmp_path / 'allbad', progress=False)


def test_compute_from_lmdb_equals_folder(tiny_vit, image_sets, tmp_path):
    from rave_basicsr.data.lmdb_util import make_lmdb

    well, back = image_sets
    make_lmdb(str(back), str(tmp_path / 'back.lmdb'))
    from_lmdb = compute_residual(tiny_vit, well, tmp_path / 'back.lmdb', progress=False)
    from_folder = compute_residual(tiny_vit, well, back, progress=False)
    assert torch.equal(from_lmdb.residual, from_folder.residual)


def test_image_only_encoder_native_sizes(image_sets):
    from rave_basicsr.guidance.encoders import build_image_encoder
    from rave_basicsr.utils.image_io import read_image

    stats = build_image_encoder(STATS)
    well, back = image_sets
    vector = compute_residual(stats, well, back, batch_size=4, keep_embeddings=True, progress=False)
    first = torch.from_numpy(read_image(str(sorted(well.iterdir())[0])).rgb).permute(2, 0, 1)[None]
    with torch.no_grad():
        torch.testing.assert_close(vector.embeddings['well_lit'][0], stats.encode_image(first)[0])
    assert vector.preprocess['resize'] == 'none' and vector.dim == stats.embed_dim
    # the residual points from dark to bright: the brightness-grid coordinates grow along it
    assert float(vector.residual[:16].sum()) > 0


# ------------------------------------------------------------------------------------------------ interpretation
def _vector_along(direction, encoder, seed=0):
    """A consistent ResidualVector whose residual is ``direction`` (for ranking tests)."""
    residual = (direction / direction.norm()).float()
    gen = torch.Generator().manual_seed(seed)
    well = torch.nn.functional.normalize(residual + 0.3 * torch.randn(residual.shape, generator=gen), dim=0)
    back = torch.nn.functional.normalize(well - residual, dim=0)
    return ResidualVector(residual=residual, threshold=float(well.double() @ residual.double()), well_lit_mean=well,
                          backlit_mean=back, counts={'well_lit': 1, 'backlit': 1},
                          encoder_identity=dict(encoder.identity), preprocess={}, history=[])


def test_prefix_encoding_equals_encode_text(tiny_vit):
    from rave_basicsr.residual.interpret import decode_vocabulary, encode_prompts

    texts = decode_vocabulary(tiny_vit, limit=4000)[::37] + ['a backlit photo of a person', 'sunlight']
    with torch.no_grad():
        full = tiny_vit.encode_text(tiny_vit.tokenize(texts))
    torch.testing.assert_close(encode_prompts(tiny_vit, texts, batch_size=16), full, atol=2e-5, rtol=1e-5)


def test_token_embedding_residual_ranks_that_token_first(tiny_vit, vocab_cache):
    from rave_basicsr.residual.interpret import clip_vocabulary, encode_prompts, interpret_residual

    vocabulary = clip_vocabulary(tiny_vit, progress=False)   # full 49408-id vocabulary, duplicates collapsed
    assert 40000 < len(vocabulary.texts) < 49408 and len(set(vocabulary.texts)) == len(vocabulary.texts)
    assert list(vocab_cache.glob('vocab/*.safetensors'))
    for word in ('sunlight ', 'shadow ', 'photo '):
        vector = _vector_along(encode_prompts(tiny_vit, [word])[0], tiny_vit)
        summary = interpret_residual(vector, tiny_vit, top=5, progress=False)
        assert summary['top'][0]['score'] == pytest.approx(1.0, abs=1e-5)
        # the winner is the token or a string that tokenises identically ('sunlight' vs 'sunlight ')
        assert torch.equal(tiny_vit.tokenize(summary['top'][0]['text']), tiny_vit.tokenize(word))
        assert summary['bottom'][0]['score'] == min(r['score'] for r in summary['bottom'])
        anti = interpret_residual(_vector_along(-encode_prompts(tiny_vit, [word])[0], tiny_vit), tiny_vit, top=3,
                                  progress=False)
        assert torch.equal(tiny_vit.tokenize(anti['bottom'][0]['text']), tiny_vit.tokenize(word))


def test_word_list_ranking(tiny_vit, tmp_path):
    from rave_basicsr.residual.interpret import encode_prompts, interpret_residual

    words = tmp_path / 'words.txt'
    words.write_text('# lighting words\nbright\n\ndark\nsunny sky\nbright\n')
    vector = _vector_along(encode_prompts(tiny_vit, ['sunny sky'])[0], tiny_vit)
    summary = interpret_residual(vector, tiny_vit, vocab=str(words), top=3, progress=False)
    assert summary['vocabulary']['size'] == 3 and summary['top'][0]['text'] == 'sunny sky'
    with pytest.raises(RaveError, match='larger than the vocabulary'):
        interpret_residual(vector, tiny_vit, vocab=str(words), top=4, progress=False)


def test_interpret_needs_text_tower_and_same_encoder(tiny_vit, image_sets):
    from rave_basicsr.guidance.encoders import build_image_encoder
    from rave_basicsr.residual.interpret import interpret_residual

    stats = build_image_encoder(STATS)
    well, back = image_sets
    vector = compute_residual(stats, well, back, progress=False)
    with pytest.raises(RaveError, match='^rave residual interpret needs an encoder with a text tower, but the configured '
                                        r'encoder \{"embed_dim": 31, "network": \{"type": "ImageStatsEncoder"\}, '
                                        r'"type": "arch"\} is image-only'):
        interpret_residual(vector, stats, progress=False)
    other = build_image_encoder(TINY_VIT_OTHER_SEED)
    with pytest.raises(RaveError, match='another encoder.*init_seed'):
        interpret_residual(_vector_along(torch.ones(32), tiny_vit), other, progress=False)


def test_projection_2d(tiny_vit, image_sets):
    from rave_basicsr.residual.interpret import projection_2d

    well, back = image_sets
    vector = compute_residual(tiny_vit, well, back, keep_embeddings=True, progress=False)
    coords = projection_2d(vector)
    assert coords['well_lit'].shape == (5, 2) and coords['backlit'].shape == (4, 2)
    # x is the coordinate along the residual: the well-lit mean projects to the threshold
    assert float(coords['means'][0, 0]) == pytest.approx(vector.threshold, abs=1e-6)
    assert float(coords['well_lit'][:, 0].mean()) > float(coords['backlit'][:, 0].mean())
    with pytest.raises(RaveError, match='--keep-embeddings'):
        projection_2d(compute_residual(tiny_vit, well, back, progress=False))


# ------------------------------------------------------------------------------------------------ debiasing
def test_shifted_residual_matches_hand_computation(tiny_vit, image_sets, tmp_path):
    from rave_basicsr.residual.debias import shift_residual
    from rave_basicsr.residual.interpret import load_vocabulary

    well, back = image_sets
    vector = compute_residual(tiny_vit, well, back, progress=False)
    new = shift_residual(vector, tiny_vit, remove_top=4, remove_bottom=3, limit=3000, progress=False)
    # by hand, in numpy, following the RAVE code's shifted residual (train_rave.py)
    vocab = load_vocabulary(tiny_vit, 'clip', limit=3000, progress=False)
    emb = vocab.embeddings.double().numpy()
    r = vector.residual.double().numpy()
    scores = emb @ r / np.linalg.norm(emb, axis=1)
    order = np.argsort(-scores, kind='stable')
    top, bottom = order[:4], np.argsort(scores, kind='stable')[:3]
    a = np.mean(emb[top] * scores[top, None], axis=0)
    b = np.mean(emb[bottom] * scores[bottom, None], axis=0)
    u = a / np.linalg.norm(a) + b / np.linalg.norm(b)
    u /= np.linalg.norm(u)
    expected = r - u * (u @ r)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(new.residual.numpy(), expected, atol=1e-6)
    assert abs(float(new.residual.double() @ torch.from_numpy(u))) < 1e-6   # orthogonal to the removed direction
    assert new.threshold == pytest.approx(float(vector.well_lit_mean.double() @ new.residual.double()), abs=1e-7)
    step = new.history[-1]
    assert step['step'] == 'remove_tokens' and [t for t, _ in step['top']] == [vocab.texts[i] for i in top]
    assert step['cosine_to_previous'] == pytest.approx(float(r @ expected), abs=1e-6)
    assert [h['step'] for h in new.history] == ['compute', 'remove_tokens']
    new.save(tmp_path / 'shifted.safetensors')           # a valid file, ready for RAVE
    ResidualVector.load(tmp_path / 'shifted.safetensors').check_encoder(tiny_vit)
    with pytest.raises(RaveError, match='larger than the vocabulary'):
        shift_residual(vector, tiny_vit, remove_top=3001, remove_bottom=1, limit=3000, progress=False)
    # the single entry point the RAVE model calls (options block {remove_top, remove_bottom})
    from rave_basicsr.residual.debias import debias_residual
    same = debias_residual(vector, tiny_vit, remove_top=4, remove_bottom=3, limit=3000, progress=False)
    assert torch.equal(same.residual, new.residual)
    with pytest.raises(RaveError, match='not both'):
        debias_residual(vector, tiny_vit, remove_top=4, concepts=['sky'])


def test_concept_removal_is_orthogonal(tiny_vit, image_sets):
    from rave_basicsr.residual.debias import remove_concepts
    from rave_basicsr.residual.interpret import encode_prompts

    well, back = image_sets
    vector = compute_residual(tiny_vit, well, back, progress=False)
    concepts = ['indoor', 'a photo of people', 'sky']
    new = remove_concepts(vector, tiny_vit, concepts)
    directions = torch.nn.functional.normalize(encode_prompts(tiny_vit, concepts).double(), dim=1)
    assert (directions @ new.residual.double()).abs().max() < 1e-6
    assert new.history[-1]['concepts'] == concepts
    assert new.history[-1]['cosine_to_previous'] == pytest.approx(float(vector.residual @ new.residual), abs=1e-6)
    from rave_basicsr.guidance.encoders import build_image_encoder
    stats = build_image_encoder(STATS)
    image_only = compute_residual(stats, well, back, progress=False)
    with pytest.raises(RaveError, match=r'^removing text concepts \(--remove-concept\) needs an encoder with a text '
                                        'tower'):
        remove_concepts(image_only, stats, ['sky'])
