from .ait import *  # noqa: F401,F403
from .paramixer import *  # noqa: F401,F403
from .ait_relational import *  # noqa: F401,F403
from .ait_tiny import *  # noqa: F401,F403
