"""``python -m timm_ait.train``: train_scripts/train.py for an installed package (no repository needed)."""
from .loop import cli

cli()
