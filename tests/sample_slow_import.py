"""A task module that takes long to import, as a large application does: a processor that
imports it is still starting for a while. It touches $SAMPLE_SLOW_IMPORT_MARK as it begins."""

import os
import time
from pathlib import Path

Path(os.environ["SAMPLE_SLOW_IMPORT_MARK"]).touch()
time.sleep(30)
