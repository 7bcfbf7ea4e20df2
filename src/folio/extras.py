"""Optional packages: import one, or stop with one line naming the extra that installs it.

The core install (requirements.txt) runs prepare, train, sample and plot; everything else is an
extra of pyproject.toml (`hf`, `gguf`, `wandb`, `tensorboard`, `serve`, `datasets`, `tokenizer`,
`eval`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from folio.errors import MissingPackageError


def need(module: str, extra: str, purpose: str, package: str = "") -> ModuleType:
    """`module` imported, or a MissingPackageError such as "folio serve needs fastapi:
    pip install 'folio[serve]'". `package` is the name to install, if not the module's root."""
    try:
        return importlib.import_module(module)
    except ImportError:  # also a module set to None in sys.modules, and torch's tensorboard
        name = package or module.partition(".")[0]
        raise MissingPackageError(f"{purpose} needs {name}: pip install 'folio[{extra}]'"
                                  ) from None
