"""Analyse an AiT's memory on a batch of images: bottleneck attention maps, diversity, Hopfield energy.

    python train_scripts/analyze.py -m ait_small_patch32_64 --checkpoint output/train/.../model_best.pth.tar \\
        --dataset triangle --output output/analysis

Writes ``analysis.json``, ``attention_<layer>.png`` (paper Fig. 4) and ``energy.png`` (Fig. 9)
into ``--output``; the diversity score (Fig. 8) is in the JSON and the figure titles, as are each
layer's mean cosine between its priors (1: the memory has collapsed to one prior) and the balance loss
of its gates. Without ``--dataset`` the images are random (standard normal in the model's normalised
input space). With ``--dataset sort-of-clevr`` the model is a question-answering AiT and image i of
the split comes with its question i mod 20, so that, as in a shuffled training batch, no two items
share an image and every kind of question is asked::

    python train_scripts/analyze.py -m ait_small_w256_patch15_75 --model-kwargs ablation=no_hopfield \\
        --checkpoint .../last.pth.tar --dataset sort-of-clevr --output output/analysis

The model and its memory are not changed (see ``timm_ait.analysis``). Needs matplotlib:
``pip install 'timm-ait[analysis]'``.
"""
import argparse
import sys

import numpy
import torch
from timm.data import create_transform, resolve_data_config
from timm.utils import ParseKwargs

from .hub import PretrainedDownloadError
from .analysis import analyze, check_analysable, require_matplotlib, save_analysis
from .run_model import load_run_model

DATASETS = ('triangle', 'sort-of-clevr')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-m', '--model', default=None, help="registered timm model name (default: the checkpoint's)")
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='K=V',
                        help='keyword arguments for timm.create_model')
    parser.add_argument('--checkpoint', default=None, help='weights (and memory) to load, e.g. a training checkpoint')
    parser.add_argument('--use-ema', action='store_true', help='analyse the EMA weights of the checkpoint')
    parser.add_argument('--pretrained', action='store_true', help="load the model's published weights")
    parser.add_argument('--dataset', default=None, choices=DATASETS, help='images to analyse (default: random)')
    parser.add_argument('--data-dir', default=None, help='dataset cache (default: $TIMM_AIT_DATA or ~/.cache/timm_ait)')
    parser.add_argument('--split', default='test', choices=('train', 'test'))
    parser.add_argument('--num-samples', type=int, default=None,
                        help="size of the generated split (default: the dataset's); the first images are used")
    parser.add_argument('-b', '--batch-size', type=int, default=64,
                        help='images analysed together: the bottleneck selects among all their patches')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--output', default='output/analysis', help='directory for the PNG and JSON files')
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: CUDA is not available; expected cpu')
    return args


def load_images(args, data_config):
    """A (B, C, H, W) batch in the model's normalised input space, and its (B, Q) questions or None."""
    if args.dataset is None:
        generator = torch.Generator().manual_seed(args.seed)
        return torch.randn(args.batch_size, *data_config['input_size'], generator=generator), None
    transform = create_transform(**data_config)
    if args.dataset == 'sort-of-clevr':
        from timm_ait.data import SortOfClevr
        dataset = SortOfClevr(root=args.data_dir, split=args.split, num_images=args.num_samples,
                              seed=args.seed, transform=transform, progress=False)
        # the index of the first item of each image (an image's items are consecutive)
        firsts = numpy.flatnonzero(numpy.diff(numpy.asarray(dataset.image_index), prepend=-1))
        counts = numpy.diff(numpy.append(firsts, len(dataset)))
        count = min(args.batch_size, len(firsts))
        inputs = [dataset[int(firsts[i] + i % counts[i])][0] for i in range(count)]
        return torch.stack([image for image, _ in inputs]), torch.stack([question for _, question in inputs])
    from timm_ait.data import TriangleDataset
    dataset = TriangleDataset(root=args.data_dir, split=args.split, num_samples=args.num_samples,
                              seed=args.seed, transform=transform)
    count = min(args.batch_size, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)]), None


def main(argv=None):
    args = parse_args(argv)
    try:
        require_matplotlib()
    except ImportError as error:
        sys.exit(str(error))
    # the one loader: the run's own model settings, its plain weights unless --use-ema, the digest checked
    loaded = load_run_model(args.checkpoint or '', model=args.model, model_kwargs=args.model_kwargs,
                            pretrained=args.pretrained, use_ema=args.use_ema)
    args.model = loaded.settings['model']
    check_analysable(loaded.model)  # an hmixer or a ViT twin is refused before any data is made
    model = loaded.model.to(args.device).eval()
    answers_questions = getattr(model, 'question_dim', None) is not None
    if answers_questions != (args.dataset == 'sort-of-clevr'):
        sys.exit(f'{args.model} answers questions about images: analyse it with --dataset sort-of-clevr'
                 if answers_questions else
                 f'{args.model} classifies images; --dataset sort-of-clevr is for a question-answering AiT')
    data_config = resolve_data_config(loaded.data_settings(), model=model)  # the run's normalisation
    # the size the model was built at, which model kwargs may have changed from its config's
    data_config['input_size'] = (data_config['input_size'][0], *model.patch_embed.img_size)
    images, questions = load_images(args, data_config)
    layers = analyze(model, images.to(args.device), None if questions is None else questions.to(args.device))

    mean = torch.tensor(data_config['mean']).view(-1, 1, 1)
    std = torch.tensor(data_config['std']).view(-1, 1, 1)
    meta = dict(model=args.model, model_kwargs=loaded.settings['model_kwargs'], checkpoint=args.checkpoint,
                use_ema=args.use_ema, pretrained=args.pretrained, dataset=args.dataset or 'random', split=args.split,
                num_images=images.shape[0], seed=args.seed)
    paths = save_analysis(layers, args.output, images[0].cpu() * std + mean, meta)
    for layer in layers:
        energy_text = ('' if layer.energy_before is None else
                       f', mean energy {layer.energy_before.mean():.3f} -> {layer.energy_after.mean():.3f}')
        print(f'{layer.name}: diversity {layer.diversity:.3f} (ceiling {layer.diversity_ceiling:.3f}), '
              f'slot cosine {layer.memory_slot_cosine:.3f} (|cos| {layer.memory_abs_cosine:.3f}, rank '
              f'{layer.memory_rank:.2f}), balance loss {layer.balance_loss:.1f}{energy_text}')
    print('wrote ' + ', '.join(paths))


def cli(argv=None) -> None:
    """``main`` for the command line: a bad request ends in one line and exit code 2."""
    try:
        main(argv)
    except (ValueError, TypeError, OSError, PretrainedDownloadError) as e:  # TypeError: a keyword it does not take
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
