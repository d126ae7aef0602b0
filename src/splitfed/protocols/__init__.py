"""The shipped protocols; importing this package registers them (``splitfed.registry``)."""

from splitfed.protocols import centralized, fedlora, hsplitlora, memsfl, sfl, sflv1, splitllm  # noqa: F401 - they register themselves
from splitfed.registry import set_default

set_default(sfl.SplitFed.name)
