#!/usr/bin/env python3
"""Publish a training checkpoint on the Hugging Face Hub, or write its Hub folder: see docs/hub.md."""
from timm_ait.publish import cli

if __name__ == '__main__':
    cli()
