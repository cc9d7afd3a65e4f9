"""A task module that kills every worker right after fork (as a C extension that cannot
survive fork would): the processor must give up with a clear exit, not spin."""

import os

os.register_at_fork(after_in_child=lambda: os._exit(1))
