"""What every role of the project shares and that needs nothing but the standard library."""

from eclm_common.lifeline import PARENT_ENV, die_with_parent, popen, starter, watch_from_env
from eclm_common.runlog import routed_to

__all__ = ["PARENT_ENV", "die_with_parent", "popen", "routed_to", "starter", "watch_from_env"]
