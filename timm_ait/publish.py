""" Publish a training checkpoint on the Hugging Face Hub, or write its Hub folder locally.

    python train_scripts/push_to_hub.py output/train/RUN/model_best.pth.tar
    python train_scripts/push_to_hub.py output/train/RUN/model_best.pth.tar --use-ema --repo-id me/my-ait
    python train_scripts/push_to_hub.py output/train/RUN/model_best.pth.tar --local-dir hub/my-ait

The model is rebuilt as it was trained (the checkpoint's model, model_kwargs and num_classes) and
the weights are checked against it. The folder holds what timm's ``save_for_hf`` writes
(config.json, model.safetensors) and a README.md rendered from hub_cards/model_card.md with the
run's results (summary.csv beside the checkpoint, and --results-file from validate.py, refused unless it
records that it measured these very weights), and says which epoch the weights are. It loads
back with ``timm.create_model('hf-hub:REPO')`` or ``('local-dir:DIR')`` once timm_ait is imported.

The repo id defaults to where ``pretrained=True`` looks: ``timm_ait.hub.hf_hub_id(model, tag)``,
the tag following from the dataset (triangle, sort_of_clevr, cifar10, cifar100, pet) unless --tag
is given.
Everything that can fail is checked before anything is uploaded or overwritten, cheapest first:
repo id, token, --local-dir, the checkpoint against the model, then the Hub connection (and the
token with it). The upload is one commit of the three files.
"""
import argparse
import os
import shutil
import sys
import tempfile

import torch

import timm
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from timm.data import resolve_data_config
from timm.models import save_for_hf

from .checkpoint import DIGEST_KEY, content_digest, read_checkpoint
from .hub import hf_hub_id
from .hub_card import read_summary, read_validation, render_model_card
from .run_model import load_run_model, run_args
from .version import __version__

# the pretrained tag of the models' default cfgs for each training-script dataset
# what a Hub folder written here holds (timm's save_for_hf and the card)
HUB_FILES = ('README.md', 'config.json', 'model.safetensors')
DATASET_TAGS = {'triangle': 'triangle', 'sort-of-clevr': 'sort_of_clevr', 'torch/cifar10': 'cifar10',
                'torch/cifar100': 'cifar100', 'torch/oxford-pet': 'pet'}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Publish a timm-ait checkpoint on the Hugging Face Hub',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('checkpoint', help='training checkpoint (model_best.pth.tar, last.pth.tar, ...)')
    parser.add_argument('--model', default=None, help="timm model name (default: the checkpoint's args.model)")
    parser.add_argument('--use-ema', action='store_true', help='publish the EMA weights of the checkpoint')
    parser.add_argument('--dataset', default=None, help="training dataset (default: the checkpoint's args.dataset)")
    parser.add_argument('--tag', default=None, help='pretrained tag, e.g. cifar10 (default: from the dataset)')
    parser.add_argument('--repo-id', default=None, help='Hub repo (default: timm_ait.hub.hf_hub_id(model, tag))')
    parser.add_argument('--summary', default=None,
                        help="the run's summary.csv (default: the one beside the checkpoint, if any)")
    parser.add_argument('--results-file', default=None, help='JSON written by validate.py --results-file')
    parser.add_argument('--local-dir', default=None, metavar='DIR', help='only write the Hub folder here')
    parser.add_argument('--overwrite', action='store_true',
                        help="replace the files of an earlier push_to_hub in --local-dir (a folder holding any "
                             "other file is refused)")
    parser.add_argument('--token', default=None, help='Hub token (default: huggingface_hub.get_token())')
    parser.add_argument('--private', action='store_true', help='create the repo private')
    parser.add_argument('--commit-message', default=None)
    return parser


def build_model(checkpoint: dict, model_name: str, tag: str, use_ema: bool, what: str) -> torch.nn.Module:
    """The model as it was trained (the one loader), refused if its weights hold NaN or inf."""
    loaded = load_run_model(checkpoint, model=model_name, tag=tag, use_ema=use_ema, what=what)
    broken = [k for k, v in loaded.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f'{what} holds non-finite values (NaN or inf) in {len(broken)} of its '
                         f'{"EMA " if use_ema else ""}weight tensors ({", ".join(broken[:3])}'
                         f'{", ..." if len(broken) > 3 else ""}): the run diverged; publish a checkpoint from '
                         'before it did')
    return loaded.model.eval()


def check_local_dir(folder: str, overwrite: bool) -> None:
    """--local-dir must be new, empty, or (with --overwrite) hold only the files this script writes.

    Nothing else in it is ever replaced or deleted: a run folder given by mistake keeps its checkpoints.
    """
    if not os.path.lexists(folder):
        return
    if not os.path.isdir(folder):
        raise FileExistsError(f'--local-dir {folder!r} exists and is not a folder')
    present = sorted(os.listdir(folder))
    links = [name for name in present if os.path.islink(os.path.join(folder, name))]
    if links:  # a write must never go through a link to a file elsewhere
        raise FileExistsError(f'--local-dir {folder!r} holds symbolic links ({", ".join(links[:5])}); expected '
                              f'regular files only: remove them or give a new folder')
    ours = set(HUB_FILES) | {f'{name}.tmp' for name in HUB_FILES}  # .tmp: an interrupted earlier copy
    foreign = [name for name in present if name not in ours]
    if foreign:
        raise FileExistsError(f'--local-dir {folder!r} holds files push_to_hub did not write ({", ".join(foreign[:5])}'
                              f'{", ..." if len(foreign) > 5 else ""}); give a new or empty folder (--overwrite only '
                              f'replaces {", ".join(HUB_FILES)})')
    if present and not overwrite:
        raise FileExistsError(f'--local-dir {folder!r} holds an earlier Hub folder ({", ".join(present)}); pass '
                              '--overwrite to replace it')


def install_file(source: str, folder: str, name: str) -> None:
    """Copy ``source`` to ``folder/name`` atomically, never writing through an existing path.

    The copy goes to a ``name.tmp`` created new (O_EXCL: an existing file or link there makes it fail, so a
    link planted there is never followed), then replaces ``name`` (a rename replaces a link, not its target).
    A failed write (a full disk) names the file and leaves no partial ``name.tmp``.
    """
    target = os.path.join(folder, name)
    temporary = target + '.tmp'
    if os.path.lexists(temporary):  # an interrupted earlier copy; unlink removes a link itself, not its target
        os.unlink(temporary)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0), 0o644)
    except OSError as e:
        raise OSError(e.errno, f'cannot create {temporary!r} new: {e.strerror}') from e
    try:
        with os.fdopen(fd, 'wb') as out, open(source, 'rb') as data:
            shutil.copyfileobj(data, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except OSError as e:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise OSError(e.errno, f'cannot write {target!r}: {e.strerror}') from e


def write_hub_folder(model, folder: str, repo_id: str, dataset: str, data_config: dict,
                     summary: dict = None, validation: dict = None, weights: dict = None) -> None:
    """config.json + model.safetensors (timm's save_for_hf) and the rendered README.md."""
    save_for_hf(model, folder, safe_serialization=True, data_config=data_config)
    card = render_model_card(model, repo_id, dataset, summary=summary, validation=validation,
                             input_size=data_config['input_size'], weights=weights)
    with open(os.path.join(folder, 'README.md'), 'w', encoding='utf-8') as f:
        f.write(card)
    # what users will do with it: the config must rebuild this model and load these weights
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    expected = model.state_dict()
    if reloaded.state_dict().keys() != expected.keys() or not all(
            torch.equal(v, expected[k]) for k, v in reloaded.state_dict().items()):
        raise ValueError(f'the folder written for {repo_id} does not load back into the same model')


def _weights_text(weights: dict) -> str:
    epoch = 'an unrecorded epoch' if weights.get('epoch') is None else f"epoch {weights['epoch']}"
    digest = weights.get('checkpoint_digest')
    return (f"the {'EMA' if weights.get('use_ema') else 'plain'} weights of {epoch} of checkpoint "
            f"{weights.get('checkpoint')!r} (checkpoint digest {digest[:23] + '...' if digest else 'none'}, "
            f"weights digest {str(weights.get('weights_digest'))[:23]}...)")


def check_results_of(validation: dict, results_file: str, weights: dict) -> None:
    """Refuse validate.py results that were not measured on the weights being published.

    ``weights``: what validate.py records of the weights it measured (see its ``measured_weights``), for the
    weights being published. Results that record no weights digest (an older validate.py) cannot be
    checked and are refused too: the card says they were measured on these weights.
    """
    if validation.get('use_ema', weights['use_ema']) != weights['use_ema']:
        measured = 'EMA' if validation['use_ema'] else 'plain (non-EMA)'
        raise ValueError(f'--results-file {results_file!r} was measured on the {measured} weights, but '
                         f'{"--use-ema publishes the EMA" if weights["use_ema"] else "these are the plain"} weights; '
                         f'validate them with{"" if weights["use_ema"] else "out"} --use-ema')
    again = (f"run validate.py --checkpoint {weights['checkpoint']}{' --use-ema' if weights['use_ema'] else ''} "
             f'--results-file {results_file} again')
    if not validation.get('weights_digest'):
        raise ValueError(f'--results-file {results_file!r} does not record which weights it measured (no '
                         f'weights_digest: an older validate.py?); expected results of {_weights_text(weights)}: '
                         f'{again}')
    differ = [key for key in ('weights_digest', 'checkpoint_digest', 'epoch', 'use_ema')
              if None not in (validation.get(key), weights.get(key)) and validation[key] != weights[key]]
    if differ:
        raise ValueError(f'--results-file {results_file!r} was measured on other weights ({", ".join(differ)} '
                         f'differ): {_weights_text(validation)}; expected {_weights_text(weights)}: {again}')


def connect(token: str) -> HfApi:
    """An HfApi whose token the Hub accepts, or a clear error (no token, token refused, Hub unreachable)."""
    api = HfApi(token=token, library_name='timm-ait', library_version=__version__)
    try:
        user = api.whoami()
    except HfHubHTTPError as e:
        raise PermissionError(f'the Hub at {api.endpoint} refused the token: {e}') from e
    except Exception as e:  # the transport's own errors (refused connection, DNS, TLS, timeout)
        raise ConnectionError(f'cannot reach the Hub at {api.endpoint}: {type(e).__name__}: {e}') from e
    print(f"Logged in to {api.endpoint} as {user.get('name')}")
    return api


def main(argv=None) -> str:
    """Publish (or write) the folder; returns the commit URL or the folder path."""
    args = build_parser().parse_args(argv)
    checkpoint = read_checkpoint(args.checkpoint)
    train_args = run_args(checkpoint)
    model_name = args.model or train_args.get('model')
    dataset = args.dataset or train_args.get('dataset')
    if not model_name or not dataset:
        raise ValueError(f'checkpoint {args.checkpoint!r} records no training args; pass --model and --dataset')
    if not timm.is_model(model_name):
        raise ValueError(f'unknown model {model_name!r}')
    tag = args.tag if args.tag is not None else DATASET_TAGS.get(dataset, '')
    repo_id = args.repo_id or hf_hub_id(model_name, tag)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f'bad repo id {repo_id!r}: {e}') from e

    token = None
    if args.local_dir:
        check_local_dir(args.local_dir, args.overwrite)
    else:
        token = args.token or get_token()
        if not token:
            raise PermissionError('no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token')

    model = build_model(checkpoint, model_name, tag, args.use_ema, f'checkpoint {args.checkpoint!r}')
    summary_path = args.summary or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), 'summary.csv')
    summary = read_summary(summary_path, ema=args.use_ema) if args.summary or os.path.isfile(summary_path) else None
    # which weights these are, as validate.py records the weights it measured
    weights = dict(checkpoint=args.checkpoint, checkpoint_digest=checkpoint.get(DIGEST_KEY),
                   epoch=checkpoint.get('epoch'), use_ema=args.use_ema, weights_digest=content_digest(model.state_dict()))
    validation = read_validation(args.results_file) if args.results_file else None
    if validation is not None:
        check_results_of(validation, args.results_file, weights)
    # the preprocessing the weights were trained with (training flags over the model's cfg)
    data_config = resolve_data_config(train_args, model=model)

    with tempfile.TemporaryDirectory() as folder:
        write_hub_folder(model, folder, repo_id, dataset, data_config, summary, validation, weights)
        if args.local_dir:
            os.makedirs(args.local_dir, exist_ok=True)
            for name in sorted(os.listdir(folder)):  # replace only the files written here, each atomically
                install_file(os.path.join(folder, name), args.local_dir, name)
            print(f'Wrote {sorted(os.listdir(folder))} to {args.local_dir}')
            return args.local_dir
        api = connect(token)
        repo_id = api.create_repo(repo_id, private=args.private, exist_ok=True).repo_id
        # one commit of three small files (create_commit, not upload_folder's multi-commit pipeline)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
                      for name in sorted(os.listdir(folder))]
        weights = 'EMA weights' if args.use_ema else 'weights'
        message = args.commit_message or f'Add {model_name} {weights} trained on {dataset}'
        commit = api.create_commit(repo_id, operations, commit_message=message)
    print(f'Published {repo_id}: {commit.commit_url}')
    return commit.commit_url


def cli(argv=None) -> None:
    """``main`` for the command line: a bad request ends in one line and exit code 2."""
    try:
        main(argv)
    except (ValueError, OSError) as e:  # OSError: missing files, refused tokens, an unreachable Hub
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
