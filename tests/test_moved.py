"""0.1.0's import paths still work after the layout by stage, and say where the names live now."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest

from retromae_st._moved import MOVED


@pytest.mark.parametrize(
    ("old", "name", "new"),
    [
        ("retromae_st.corpus", "PaddingCollator", "retromae_st.data.batching"),
        ("retromae_st.corpus", "load_texts", "retromae_st.data.sources"),
        ("retromae_st.corpus", "tokenize_corpus", "retromae_st.data.tokenize"),
        ("retromae_st.loss", "RetroMAELoss", "retromae_st.pretraining.loss"),
        ("retromae_st.training", "RetroMAETrainingCallback", "retromae_st.pretraining.training"),
        ("retromae_st.training", "pretrain", "retromae_st.pretraining.training"),
    ],
)
def test_old_path_gives_the_same_object_with_a_deprecation_warning(old, name, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_every_old_path_resolves_to_existing_modules():
    for old, targets in MOVED.items():
        for target in targets:
            importlib.import_module(target)
        assert importlib.util.find_spec(old) is not None, old


def test_finetune_stays_the_stage_2_function():
    # 0.1.0's module retromae_st.finetune is not aliased: the name is the exported function now.
    import retromae_st

    assert "retromae_st.finetune" not in MOVED
    assert (
        callable(retromae_st.finetune) and retromae_st.finetune.__module__ == "retromae_st.finetuning.train"
    )


def test_unknown_name_names_the_new_modules():
    sys.modules.pop("retromae_st.loss", None)
    with pytest.warns(DeprecationWarning):
        module = importlib.import_module("retromae_st.loss")
    with pytest.raises(AttributeError, match="pretraining.loss"):
        module.NoSuchName  # noqa: B018


def test_from_import_in_a_fresh_interpreter():
    # What an 0.1.0 script does: the names import, and the only noise is one DeprecationWarning per module.
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n    from retromae_st.loss import RetroMAELoss\nexcept DeprecationWarning as w:\n    print('warned', w)\n"
        "warnings.simplefilter('ignore')\n"
        "from retromae_st.loss import RetroMAELoss\nfrom retromae_st.corpus import PaddingCollator\n"
        "import retromae_st.pretraining.loss as new\nprint(RetroMAELoss is new.RetroMAELoss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "warned retromae_st.loss moved" in out
    assert out.strip().endswith("True")
