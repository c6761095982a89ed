"""Time and peak memory of one guided training step (network forward/backward + guidance + identity loss).

Batch 8 at reduced resolution with ViT-B-32-sized (guidance) and RN101-sized (identity, fp16 on CUDA as in the
originals, fp32 on CPU) randomly initialised encoders, for RAVE, CLIP-LIT and CLIP-LIT-Latent, plus the options
that leave the loss unchanged (or nearly: autocast) against the RAVE baseline in the same run. Each configuration
runs in its own subprocess so that peak memory (CUDA max allocated, else peak RSS) is its own.

Usage: python bench/bench_guidance_step.py [--size 128] [--batch 8] [--steps 3]
Writes bench/results/guidance_step.json and guidance_step.md.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / 'results'
CONFIGS = [
    ('rave', 'baseline'), ('clip_lit', 'baseline'), ('clip_lit_latent', 'baseline'),
    ('rave', 'input_no_grad'), ('rave', 'channels_last'), ('rave', 'autocast'),
]


def run_one(method, option, size, batch, steps):
    import rave_basicsr  # noqa: F401
    from rave_basicsr.archs.backlit_unet_arch import BacklitUNet
    from rave_basicsr.guidance.encoders import build_image_encoder
    from rave_basicsr.losses.clip_guidance_loss import CLIPIdentityLoss, PromptGuidanceLoss, ResidualVectorLoss

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.manual_seed(0)
    net, net_name = BacklitUNet(outer_padding='zeros').to(device), 'BacklitUNet'

    guidance = build_image_encoder({'model': 'ViT-B-32', 'pretrained': None}).to(device)
    identity = build_image_encoder({'model': 'RN101', 'pretrained': None,
                                    'precision': 'fp16' if device.type == 'cuda' else 'fp32'},
                                   role='identity').to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-5, weight_decay=1e-3)
    id_loss = CLIPIdentityLoss(loss_weight=22.5)
    if method == 'rave':
        residual = nn.functional.normalize(torch.randn(512, device=device), dim=0)
        guide_loss = ResidualVectorLoss(loss_weight=1920)
        guide = lambda emb: guide_loss(emb, residual, 0.3)  # noqa: E731
    else:
        if method == 'clip_lit':
            from rave_basicsr.guidance.prompts import init_soft_prompts
            with torch.no_grad():  # text features: once per network phase, outside the step
                pair = guidance.encode_soft_prompts(init_soft_prompts(guidance).to(device))
        else:
            pair = torch.randn(2, 512, device=device)
        prompt_loss = PromptGuidanceLoss(loss_weight=320)
        guide = lambda emb: prompt_loss(emb, pair)  # noqa: E731
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, size, size, generator=generator).to(device)
    if option == 'channels_last':
        net = net.to(memory_format=torch.channels_last)
        identity.network.to(memory_format=torch.channels_last)
        guidance.network.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    autocast_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=option == 'autocast'):
            out = net(images)
            if option == 'input_no_grad':
                with torch.no_grad():
                    target = identity.encode_image_features(images)
            else:
                target = identity.encode_image_features(images)
            loss = guide(guidance.encode_image(out)) + id_loss(identity.encode_image_features(out), target)
        loss.backward()
        optimizer.step()
        return float(loss)

    first_loss = step()  # warm-up step, also the loss reported for equivalence
    net.load_state_dict(state)
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == 'cuda'
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {'method': method, 'option': option, 'network': net_name, 'device': str(device),
            'step_s_median': sorted(times)[len(times) // 2], 'step_s_all': times,
            'peak_memory_mb': peak / 2 ** 20, 'memory_kind': 'cuda_max_allocated' if device.type == 'cuda'
            else 'peak_rss', 'first_step_loss': first_loss}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--one', nargs=2, metavar=('METHOD', 'OPTION'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import rave_basicsr  # noqa: F401
    from rave_basicsr.utils.hardware import device_description

    if args.one:
        print(json.dumps(run_one(*args.one, args.size, args.batch, args.steps)))
        return
    rows = []
    for method, option in CONFIGS:
        cmd = [sys.executable, __file__, '--one', method, option, '--size', str(args.size), '--batch',
               str(args.batch), '--steps', str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1]['method'], rows[-1]['option'], f"{rows[-1]['step_s_median']:.3f} s", flush=True)
    base = next(r for r in rows if r['method'] == 'rave' and r['option'] == 'baseline')
    for r in rows:
        r['speedup_vs_rave_baseline'] = base['step_s_median'] / r['step_s_median']
        r['loss_rel_diff_vs_rave_baseline'] = (abs(r['first_step_loss'] - base['first_step_loss'])
                                               / abs(base['first_step_loss']) if r['method'] == 'rave' else None)
    meta = {'size': args.size, 'batch': args.batch, 'steps': args.steps, 'torch': torch.__version__,
            'machine': device_description(torch.device(rows[0]['device'])), 'threads': torch.get_num_threads(),
            'encoders': 'ViT-B-32 (guidance) + RN101 (identity), random init, 224x224 encoder input'}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / 'guidance_step.json').write_text(json.dumps({'meta': meta, 'rows': rows}, indent=2))
    lines = [f"# Guided training step, batch {args.batch}, {args.size}x{args.size} images ({rows[0]['device']})", '',
             f"Network: {rows[0]['network']}. {meta['encoders']}. torch {meta['torch']}, {meta['threads']} threads. "
             f"Median of {args.steps} steps after one warm-up step.", '',
             '| method | option | step (s) | speed-up vs RAVE baseline | peak memory (MiB) | loss rel. diff |',
             '|---|---|---|---|---|---|']
    for r in rows:
        diff = '' if r['loss_rel_diff_vs_rave_baseline'] is None else f"{r['loss_rel_diff_vs_rave_baseline']:.1e}"
        lines.append(f"| {r['method']} | {r['option']} | {r['step_s_median']:.3f} | "
                     f"{r['speedup_vs_rave_baseline']:.2f}x | {r['peak_memory_mb']:.0f} ({r['memory_kind']}) | {diff} |")
    (RESULTS / 'guidance_step.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
