"""Compatibility module: BraTS layouts, case discovery and volume reading moved to
:mod:`modeling_emrfuse.brats_io`, the one home of BraTS case input/output (it travels to the Hub
with the model code, so the pipeline and the processor can use it). Everything it exports is
re-exported here so that ``from datasets_scripts.brats_layouts import discover_cases`` and the like
keep working; new code imports from ``modeling_emrfuse.brats_io``.
"""

from modeling_emrfuse.brats_io import *  # noqa: F401,F403
from modeling_emrfuse.brats_io import __all__  # noqa: F401
