"""The defenses, one module per method or family of methods (peft's ``tuners/<method>/`` shape):
each is a config class plus one stage function, and registers its plan builder in
``registry.DEFENSES`` in one line. ``base.py`` holds what they share (the defender's data, the
stage plan, :func:`run_stage`). Importing this package registers the built-in ones: Locphylax
(``locphylax.py``) first, then the baselines.
"""

# in this order, which is the order the registry, the CLI and the app list them in
from . import locphylax  # noqa: F401,I001  (each registers itself)
from . import finetune  # noqa: F401,I001
from . import fine_pruning  # noqa: F401,I001
from . import crow  # noqa: F401,I001
from . import bdvax  # noqa: F401,I001
from . import onion  # noqa: F401,I001
