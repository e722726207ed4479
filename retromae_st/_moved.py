"""The import paths of 0.1.0, before the package was laid out by stage (``data/``, ``pretraining/``,
``finetuning/``): ``import retromae_st.loss`` and ``from retromae_st.corpus import PaddingCollator`` keep
working, with a :class:`DeprecationWarning` naming the new module. They are removed in 0.3.

One import hook instead of ten stub files, so the folder listing shows only the new layout.
``retromae_st.finetune`` is not among them: that name is now the stage-2 function, exported from
``retromae_st`` (its 0.1.0 module is ``retromae_st.finetuning.*``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

# old module -> the modules its names live in now (the first that has a name wins)
MOVED: dict[str, tuple[str, ...]] = {
    "retromae_st.corpus": (
        "retromae_st.data.sources",
        "retromae_st.data.tokenize",
        "retromae_st.data.batching",
    ),
    "retromae_st.beir": ("retromae_st.data.beir",),
    "retromae_st.quickstart": ("retromae_st.data.python_docs",),
    "retromae_st.masking": ("retromae_st.pretraining.masking",),
    "retromae_st.encoders": ("retromae_st.pretraining.encoders",),
    "retromae_st.decoder": ("retromae_st.pretraining.decoder",),
    "retromae_st.heads": ("retromae_st.pretraining.heads",),
    "retromae_st.unpadding": ("retromae_st.pretraining.unpadding",),
    "retromae_st.loss": ("retromae_st.pretraining.loss",),
    "retromae_st.training": ("retromae_st.pretraining.training",),
}


class _MovedModule(types.ModuleType):
    """Resolves each name from the new modules on first use."""

    def __init__(self, name: str, targets: Sequence[str]) -> None:
        super().__init__(name, f"Deprecated alias of {', '.join(targets)}.")
        self._targets = tuple(targets)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, name):
                value = getattr(module, name)
                setattr(self, name, value)
                return value
        raise AttributeError(
            f"module {self.__name__!r} (now {', '.join(self._targets)}) has no attribute {name!r}"
        )

    def __dir__(self) -> list[str]:
        names: set[str] = set()
        for target in self._targets:
            names.update(n for n in dir(importlib.import_module(target)) if not n.startswith("_"))
        return sorted(names)


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MovedModule(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        targets = MOVED[module.__name__]
        warnings.warn(
            f"{module.__name__} moved in retromae-st 0.2: import from {' / '.join(targets)} (or from "
            "retromae_st itself); the old path goes away in 0.3.",
            DeprecationWarning,
            stacklevel=2,
        )


def install() -> None:
    """Put the hook on ``sys.meta_path`` once (after the normal finders: a real file always wins)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
