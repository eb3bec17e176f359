"""Where the published weights live: one Hugging Face Hub organisation for every model."""
import re
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

__all__ = ["HF_HUB_ORG", "hf_hub_id", "explain_download_errors", "PretrainedDownloadError"]

HF_HUB_ORG = "timm-ait"


def hf_hub_id(model_name: str, tag: str = "") -> str:
    """Hub repo id of a published model, e.g. ``timm-ait/ait_small_patch4_32.cifar10``."""
    return f"{HF_HUB_ORG}/{model_name}.{tag}" if tag else f"{HF_HUB_ORG}/{model_name}"


def _chain(error: BaseException) -> List[BaseException]:
    errors = []
    while error is not None and error not in errors:
        errors.append(error)
        error = error.__cause__ or error.__context__
    return errors


def _repo_of(variant: str, build_kwargs: Dict[str, Any]) -> Optional[str]:
    """The Hub repo timm resolves for this build (the tag asked for, or the variant's default)."""
    from timm.models._builder import resolve_pretrained_cfg
    try:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=build_kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=build_kwargs.get('pretrained_cfg_overlay'))
    except Exception:  # only for the message: never hide the download error behind another one
        return None
    return cfg.hf_hub_id if cfg is not None else None


def _explain(variant: str, error: BaseException, repo: Optional[str]) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError)

    chain = _chain(error)
    text = " ".join(str(e) for e in chain)
    if repo is None:
        found = re.search(r"([\w.-]+/[\w.-]+)/resolve/", text)
        repo = found.group(1) if found else None
    where = f"Hub repo {repo} at {constants.ENDPOINT}" if repo else f"the Hub at {constants.ENDPOINT}"
    head = f"cannot load the pretrained weights of {variant!r} from {where}: "
    if any(isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)) for e in chain):
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        return (head + f"they are not in the local cache {constants.HF_HUB_CACHE} and the Hub cannot be "
                f"reached{offline}. Download them once with network access, or load a local file with "
                "pretrained_cfg_overlay=dict(file='model.safetensors').")
    if any(isinstance(e, GatedRepoError) for e in chain):
        return head + "the repo is gated; accept its terms on the Hub and log in (`hf auth login`)."
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return head + ("no such repo (not published yet, private, or a different HF_ENDPOINT); "
                       "if it is private, log in (`hf auth login`).")
    return head + str(error)


class PretrainedDownloadError(RuntimeError):
    """Pretrained weights could not be downloaded; the message names the model, the repo and a remedy."""


@contextmanager
def explain_download_errors(variant: str, build_kwargs: Optional[Dict[str, Any]] = None) -> Iterator[None]:
    """Re-raise huggingface_hub's download errors as one that names the model, the repo and a remedy.

    The original error stays attached as the cause. Used around ``build_model_with_cfg``, with the
    keyword arguments given to it (they hold the pretrained tag or cfg asked for).
    """
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except (EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled) as e:
        raise PretrainedDownloadError(_explain(variant, e, _repo_of(variant, build_kwargs or {}))) from e
