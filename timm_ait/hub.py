"""Where the published weights live: one Hugging Face Hub organisation for every model."""

HF_HUB_ORG = "timm-ait"


def hf_hub_id(model_name: str, tag: str = "") -> str:
    """Hub repo id of a published model, e.g. ``timm-ait/ait_small_patch4_32.cifar10``."""
    return f"{HF_HUB_ORG}/{model_name}.{tag}" if tag else f"{HF_HUB_ORG}/{model_name}"
