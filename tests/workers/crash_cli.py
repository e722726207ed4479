"""Run the ``retromae-st`` CLI and SIGKILL the process at one exact point; used by tests/test_reliability.py.

Usage: ``python crash_cli.py WHEN STEP CLI-ARGS...`` where WHEN is one of

* ``after-save``: right after checkpoint STEP is complete (every ``on_save`` callback has run);
* ``before-sidecar``: checkpoint STEP has the trainer's files but not yet the RetroMAE decoder weights;
* ``before-state``: checkpoint STEP has the model, optimizer and RNG state but not ``trainer_state.json``;
* ``in-final``: while the final model is being written (its temporary folder exists, ``final/`` not yet).

The kill is deterministic (no timers): the process dies at that point of the code, as on a power cut.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(when: str, step: int) -> None:
    if when == "after-save":
        from transformers.trainer_callback import CallbackHandler

        original = CallbackHandler.on_save

        def on_save(self, args, state, control):
            control = original(self, args, state, control)
            if state.global_step == step:
                _die()
            return control

        CallbackHandler.on_save = on_save
    elif when == "before-sidecar":
        from retromae_st.pretraining.loss import RetroMAELoss

        original = RetroMAELoss.save_own_weights

        def save_own_weights(self, folder):
            if Path(folder).name == f"checkpoint-{step}":
                _die()
            return original(self, folder)

        RetroMAELoss.save_own_weights = save_own_weights
    elif when == "before-state":
        from transformers import TrainerState

        original = TrainerState.save_to_json

        def save_to_json(self, json_path):
            if Path(json_path).parent.name == f"checkpoint-{step}":
                _die()
            return original(self, json_path)

        TrainerState.save_to_json = save_to_json
    elif when == "in-final":
        from sentence_transformers import SentenceTransformer

        original = SentenceTransformer.save_pretrained

        def save_pretrained(self, path, *args, **kwargs):
            if Path(path).name.startswith(".final.tmp-"):
                original(self, path, *args, **kwargs)  # the temporary folder is full, the rename never comes
                _die()
            return original(self, path, *args, **kwargs)

        SentenceTransformer.save_pretrained = save_pretrained
    else:
        raise SystemExit(f"unknown kill point {when!r}")


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    from retromae_st import cli

    sys.exit(cli.main(sys.argv[3:]))
