"""bnexp: a command-line experiment runner for batch-normalization science."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# Hydra finds launcher plugins only in the `hydra_plugins` namespace package, so
# bnexp's (hydra/launcher=vectorized) lives in bnexp/_plugins/hydra_plugins/. A
# wheel installs it as top-level hydra_plugins/ (pyproject.toml: force-include)
# and leaves bnexp/_plugins out; from a source tree (PYTHONPATH, the tests, an
# editable install, whose copy of the plugin may be older) this puts the tree's
# own first on sys.path. It runs before Hydra looks for plugins: every bnexp
# entry point imports bnexp first, and so does a joblib or submitit worker when
# it unpickles its job's task function (bnexp.hydra_app.task), before its Hydra
# scans for plugins again (checked: sweeps through both launchers, tests/).
_PLUGINS = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "_plugins")
if _os.path.isdir(_PLUGINS) and _PLUGINS not in _sys.path:
    _sys.path.insert(0, _PLUGINS)
