from .ait import *  # noqa: F401,F403
