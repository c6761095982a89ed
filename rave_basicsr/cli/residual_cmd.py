"""``rave residual``: compute, interpret and debias RAVE residual vectors (docs/residual.md)."""
import argparse
import json
import os

from rave_basicsr.residual.compute import compute_residual
from rave_basicsr.residual.debias import check_debias_options, debias_residual
from rave_basicsr.residual.encoder_spec import build_encoder_for_residual, build_encoder_from_spec
from rave_basicsr.residual.interpret import format_tables, interpret_residual
from rave_basicsr.residual.plot import save_plot
from rave_basicsr.residual.vector import ResidualVector
from rave_basicsr.utils.errors import RaveError

COMMAND = 'residual'
HELP = 'compute, interpret and debias RAVE residual vectors (well-lit minus backlit embedding direction)'
ENCODER_HELP = ('the image encoder: KIND:NAME[:WEIGHTS] (open_clip:ViT-B-32:openai, open_clip:rave-test-tiny-vit, '
                'timm:resnet18, arch:ImageStatsEncoder) or a .yml/.json encoder option block (docs/residual.md)')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='residual_command', metavar='ACTION')
    compute = sub.add_parser('compute', help='residual of a well-lit and a backlit image set (folders or LMDBs)')
    compute.add_argument('--well-lit', required=True, help='folder or .lmdb of well-lit images')
    compute.add_argument('--backlit', required=True, help='folder or .lmdb of backlit images')
    compute.add_argument('--encoder', required=True, help=ENCODER_HELP)
    compute.add_argument('-o', '--output', required=True, help='residual file to write (.safetensors)')
    compute.add_argument('--batch-size', type=int, default=16)
    compute.add_argument('--workers', type=int, default=2, help='data-loader worker processes (default 2)')
    compute.add_argument('--strict', action='store_true', help='stop at the first unreadable image')
    compute.add_argument('--keep-embeddings', action='store_true',
                         help='store per-image embeddings (for the 2-D projection of `interpret --plot`)')
    compute.add_argument('--overwrite', action='store_true', help='replace an existing output file')

    interpret = sub.add_parser('interpret', help='rank a vocabulary by cosine with a residual')
    interpret.add_argument('file', help='residual file')
    interpret.add_argument('--encoder', help=ENCODER_HELP + '; must be the one that made FILE (default: the '
                           'encoder recorded in FILE, unless it was loaded from a local weights file)')
    _vocab_arguments(interpret)
    interpret.add_argument('--top', type=int, default=20, help='rows in each table (default 20)')
    interpret.add_argument('--plot', help='write a bar chart (and projection, if embeddings are stored) to a .png')
    interpret.add_argument('--json', action='store_true', help='print the result as JSON instead of tables')
    interpret.add_argument('--overwrite', action='store_true', help='replace an existing --plot file')

    debias = sub.add_parser('debias', help='remove token or concept directions from a residual')
    debias.add_argument('file', help='residual file')
    debias.add_argument('--encoder', help=ENCODER_HELP + '; must be the one that made FILE (default: the encoder '
                        'recorded in FILE, unless it was loaded from a local weights file)')
    debias.add_argument('--remove-top', type=int, metavar='K',
                        help='remove the direction of the K most aligned vocabulary entries (originals: 15)')
    debias.add_argument('--remove-bottom', type=int, metavar='K',
                        help='... and of the K most anti-aligned ones (originals: 15); a side not given is 0')
    debias.add_argument('--remove-concept', nargs='+', metavar='TEXT', help='remove these texts\' directions')
    _vocab_arguments(debias)
    debias.add_argument('-o', '--output', required=True, help='new residual file')
    debias.add_argument('--overwrite', action='store_true', help='replace an existing output file')


def _vocab_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--vocab', default='clip', help='"clip" (the tokenizer vocabulary) or a word-list file')
    parser.add_argument('--vocab-limit', type=int, metavar='N',
                        help='use only the first N vocabulary entries (quick checks; default: all)')


def _refuse_existing(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise RaveError(f'{path} already exists; choose another output name or pass --overwrite.')


def run_compute(args: argparse.Namespace) -> int:
    _refuse_existing(args.output, args.overwrite)
    encoder = build_encoder_from_spec(args.encoder)
    vector = compute_residual(encoder, args.well_lit, args.backlit, batch_size=args.batch_size,
                              num_workers=args.workers, strict=args.strict, keep_embeddings=args.keep_embeddings)
    vector.save(args.output, overwrite=args.overwrite)
    skipped = {k: len(v) for k, v in vector.history[0]['skipped'].items()}
    print(f'wrote {args.output}: {vector.counts["well_lit"]} well-lit and {vector.counts["backlit"]} backlit '
          f'images ({skipped["well_lit"]} and {skipped["backlit"]} unreadable ones skipped), {vector.dim}-d, '
          f'threshold {vector.threshold:.6f}')
    return 0


def run_interpret(args: argparse.Namespace) -> int:
    if args.plot:
        _refuse_existing(args.plot, args.overwrite)
    vector = ResidualVector.load(args.file)
    encoder = build_encoder_for_residual(args.encoder, vector.encoder_identity)
    summary = interpret_residual(vector, encoder, vocab=args.vocab, top=args.top, limit=args.vocab_limit)
    if args.plot:
        save_plot(args.plot, summary, vector, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2) if args.json else format_tables(summary))
    if args.plot and not args.json:
        print(f'\nwrote {args.plot}')
    return 0


def run_debias(args: argparse.Namespace) -> int:
    check_debias_options(args.remove_top, args.remove_bottom, args.remove_concept)
    _refuse_existing(args.output, args.overwrite)
    vector = ResidualVector.load(args.file)
    encoder = build_encoder_for_residual(args.encoder, vector.encoder_identity)
    new = debias_residual(vector, encoder, remove_top=args.remove_top, remove_bottom=args.remove_bottom,
                          concepts=args.remove_concept, vocab=args.vocab, limit=args.vocab_limit)
    new.save(args.output, overwrite=args.overwrite)
    step = new.history[-1]
    if step['step'] == 'remove_tokens':
        print('removed the direction of the top entries:', ' '.join(repr(t) for t, _ in step['top']) or '-')
        print('and of the bottom entries:', ' '.join(repr(t) for t, _ in step['bottom']) or '-')
    else:
        print('removed concepts:', ', '.join(f'{c!r} (cosine {s:+.4f})'
                                             for c, s in zip(step['concepts'], step['concept_cosines'])))
    print(f'cosine(old, new residual) = {step["cosine_to_previous"]:.6f}; threshold {step["previous_threshold"]:.6f}'
          f' -> {step["threshold"]:.6f}')
    print(f'wrote {args.output}')
    return 0


ACTIONS = {'compute': run_compute, 'interpret': run_interpret, 'debias': run_debias}


def run(args: argparse.Namespace) -> int:
    if args.residual_command is None:
        raise RaveError('choose an action: rave residual compute | interpret | debias (see rave residual --help).')
    return ACTIONS[args.residual_command](args)
