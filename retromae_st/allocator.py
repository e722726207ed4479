"""The memory allocator a training process runs on, and where to find a leaner one for CPU training (Linux).

A training step on the CPU allocates and frees large tensors every step. glibc's ``malloc`` maps the largest
ones afresh each time (the kernel then zero-fills them page by page); tcmalloc keeps and reuses them. At
BERT-base, L=128, that lowered the peak RSS by 0.43-0.54 GiB in every run (steps 6% +- 4% faster, which
is within this machine's noise; ``benchmarks/results/allocators_base128.md``). The allocator is fixed
when a process starts (``LD_PRELOAD``), so a running process can only say which one it has and how to
start with another.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

# Allocators a process can be started on with LD_PRELOAD, by the name their shared library carries.
PRELOADABLE = ("tcmalloc", "jemalloc", "mimalloc")
# tcmalloc's library names, the packaged one first (Debian/Ubuntu: libtcmalloc-minimal4; conda: gperftools).
TCMALLOC_LIBRARIES = (
    "libtcmalloc_minimal.so.4",
    "libtcmalloc.so.4",
    "libtcmalloc_minimal.so",
    "libtcmalloc.so",
)
HINT_START = "Training on the CPU with the default malloc"


def loaded_allocator(maps: Path = Path("/proc/self/maps")) -> str:
    """``"tcmalloc"``, ``"jemalloc"`` or ``"mimalloc"`` when that library is mapped into this process, else
    ``"default"`` (glibc's ``malloc`` on Linux; also where ``maps`` cannot be read, as off Linux)."""
    try:
        mapped = maps.read_text()
    except OSError:
        return "default"
    return next((name for name in PRELOADABLE if f"lib{name}" in mapped), "default")


def library_folders() -> list[Path]:
    """Where a tcmalloc library may be installed: this environment's and conda's lib folders, then the
    system's (the multiarch folder, e.g. ``/usr/lib/x86_64-linux-gnu``, first)."""
    folders = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        folders.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        folders += [Path("/usr/lib") / multiarch, Path("/lib") / multiarch]
    return folders + [Path("/usr/local/lib"), Path("/usr/lib"), Path("/usr/lib64")]


def find_tcmalloc(folders: list[Path] | None = None) -> Path | None:
    """The first tcmalloc library in ``folders`` (default: :func:`library_folders`), else None."""
    for folder in library_folders() if folders is None else folders:
        for name in TCMALLOC_LIBRARIES:
            if (folder / name).is_file():
                return folder / name
    return None


def allocator_hint(maps: Path = Path("/proc/self/maps"), folders: list[Path] | None = None) -> str | None:
    """One sentence for the start of CPU training when this Linux process runs on the default ``malloc``:
    the ``LD_PRELOAD`` to start it with instead (the installed tcmalloc's path where there is one), else None."""
    if not sys.platform.startswith("linux") or loaded_allocator(maps) != "default":
        return None
    found = find_tcmalloc(folders)
    preload = (
        f"LD_PRELOAD={found}"
        if found
        else "LD_PRELOAD=.../libtcmalloc_minimal.so.4 (Debian/Ubuntu: apt install libtcmalloc-minimal4)"
    )
    return (
        f"{HINT_START}: start the command with {preload} for a lower peak memory "
        "(README: Performance, 'A leaner allocator')."
    )


def log_allocator(device_type: str) -> None:
    """Log which allocator this process trains on; on a Linux CPU with the default one, the hint (console)."""
    hint = allocator_hint() if device_type == "cpu" else None
    if hint:
        logger.info(hint)
    else:
        logger.info("Memory allocator: %s", loaded_allocator())
