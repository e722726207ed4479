"""Which malloc a training process runs on, and the hint to tcmalloc on CPUs (retromae_st/allocator.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retromae_st import allocator
from retromae_st.allocator import HINT_START, allocator_hint, find_tcmalloc, loaded_allocator
from retromae_st.cli import ConsoleFilter

GLIBC_MAPS = "7f00-7f01 r-xp 00000000 00:00 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
TCMALLOC_MAPS = (
    GLIBC_MAPS + "7f02-7f03 r-xp 00000000 00:00 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\n"
)


def _maps(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "maps"
    path.write_text(text)
    return path


def test_the_loaded_allocator_is_read_from_the_process_maps(tmp_path):
    assert loaded_allocator(_maps(tmp_path, GLIBC_MAPS)) == "default"
    assert loaded_allocator(_maps(tmp_path, TCMALLOC_MAPS)) == "tcmalloc"
    assert loaded_allocator(_maps(tmp_path, GLIBC_MAPS + "x /opt/lib/libjemalloc.so.2\n")) == "jemalloc"
    assert loaded_allocator(tmp_path / "missing") == "default"


def test_tcmalloc_is_found_in_the_first_folder_that_has_it(tmp_path):
    empty, system = tmp_path / "env-lib", tmp_path / "system-lib"
    empty.mkdir()
    system.mkdir()
    assert find_tcmalloc([empty, system]) is None
    (system / "libtcmalloc.so.4").write_bytes(b"")
    (system / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_tcmalloc([empty, system]) == system / "libtcmalloc_minimal.so.4"  # the packaged name first


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD hints are for Linux")
def test_the_hint_names_the_installed_library_or_how_to_install_one(tmp_path):
    folder = tmp_path / "lib"
    folder.mkdir()
    without = allocator_hint(_maps(tmp_path, GLIBC_MAPS), [folder])
    assert (
        without is not None
        and without.startswith(HINT_START)
        and "apt install libtcmalloc-minimal4" in without
    )
    (folder / "libtcmalloc_minimal.so.4").write_bytes(b"")
    found = allocator_hint(_maps(tmp_path, GLIBC_MAPS), [folder])
    assert f"LD_PRELOAD={folder / 'libtcmalloc_minimal.so.4'} " in found
    assert allocator_hint(_maps(tmp_path, TCMALLOC_MAPS), [folder]) is None  # already on tcmalloc


def test_the_console_shows_the_hint_and_run_log_alone_names_the_allocator(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(
        allocator, "allocator_hint", lambda: "Training on the CPU with the default malloc: ..."
    )
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "tcmalloc")
    with caplog.at_level(logging.INFO, logger="retromae_st.allocator"):
        allocator.log_allocator("cpu")
        allocator.log_allocator("cuda")  # on a GPU the host allocator matters little: no hint
    shown = [record.getMessage() for record in caplog.records if ConsoleFilter().filter(record)]
    assert [record.getMessage() for record in caplog.records] == [
        "Training on the CPU with the default malloc: ...",
        "Memory allocator: tcmalloc",
    ]
    assert shown == ["Training on the CPU with the default malloc: ..."]


@pytest.mark.skipif(
    find_tcmalloc() is None, reason="no tcmalloc installed (apt install libtcmalloc-minimal4)"
)
def test_a_process_started_with_tcmalloc_knows_it():
    code = "from retromae_st.allocator import allocator_hint, loaded_allocator; print(loaded_allocator(), allocator_hint())"
    env = {**os.environ, "LD_PRELOAD": str(find_tcmalloc())}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["tcmalloc", "None"]
    plain = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=plain, capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("default " + HINT_START)
