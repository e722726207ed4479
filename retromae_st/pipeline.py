"""Running a recipe end to end: model -> stage 1 -> stage 2 -> evaluation, resumable.

Layout of a run's output folder::

    run.log                 everything logged, appended across re-runs
    recipe.yaml             the validated recipe as it ran (overrides applied); a re-run must match it
    .retromae-st.lock       flock'ed for the whole run (holds the pid): one run per folder
    init/                   the initial model (from scratch: random weights + trained tokenizer)
    stage1/                 RetroMAE pretraining: checkpoints/, final/, decoder/, training_log.json
    stage2/                 fine-tuning: checkpoints/, final/ (with training_log.json)
    stage2-only/            with evaluation.compare_no_pretraining: the same stage 2 from init/ (no stage 1)
    data/                   derived data (the quickstart's held-out pairs as a BEIR folder)
    cache/                  tokenised corpus and embedding caches
    report/                 report.md, report.json, plots

A stage whose ``final/`` exists is skipped; a stage interrupted mid-way resumes from its last complete
checkpoint; so re-running the same command after a crash continues instead of starting over. Every
folder appears atomically (complete or not at all). ``overwrite=True`` starts the run afresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset
from sentence_transformers import SentenceTransformer

from retromae_st.errors import UserInputError
from retromae_st.io import LOCK_FILE, atomic_dir, atomic_write_json, atomic_write_text, output_lock
from retromae_st.recipes import PYTHON_DOCS, Recipe

logger = logging.getLogger(__name__)
NO_PRETRAINING_TITLE = "RetroMAE stage 1 vs none"


class Run:
    """The output folder of one recipe run, and the paths of its stages."""

    def __init__(self, recipe: Recipe, folder: str | os.PathLike) -> None:
        self.recipe = recipe
        self.folder = Path(folder)
        self._corpus: Dataset | None = None
        # Evaluation keys that differ from the folder's recipe.yaml: the report is made again with them.
        self.evaluation_changed: list[str] = []

    def corpus(self) -> Dataset:
        """The stage-1 corpus, read once per run (the tokenizer and stage 1 both need it)."""
        if self._corpus is None:
            self._corpus = corpus_dataset(self.recipe)
        return self._corpus

    init = property(lambda self: self.folder / "init")
    stage1 = property(lambda self: self.folder / "stage1")
    stage2 = property(lambda self: self.folder / "stage2")
    stage2_only = property(lambda self: self.folder / "stage2-only")
    report = property(lambda self: self.folder / "report")
    cache = property(lambda self: self.folder / "cache")
    data = property(lambda self: self.folder / "data")

    @staticmethod
    def done(stage: Path) -> bool:
        return (stage / "final" / "modules.json").is_file() or (stage / "modules.json").is_file()


def load_own_model(folder: Path) -> SentenceTransformer:
    """Reload a model this run wrote (init/ or a stage's final/): stock modules, safetensors only."""
    return SentenceTransformer(str(folder), model_kwargs={"use_safetensors": True})


def add_file_logging(folder: Path) -> logging.Handler:
    """Log everything (ours, the trainer's) to ``folder/run.log`` as well as the console."""
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    if logging.getLogger().level > logging.INFO or logging.getLogger().level == logging.NOTSET:
        logging.getLogger().setLevel(logging.INFO)
    return handler


def run_recipe(
    recipe: Recipe,
    folder: str | os.PathLike,
    *,
    overwrite: bool = False,
    command: str | None = None,
    export_to: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run every enabled stage of ``recipe`` into ``folder``; return what was produced where.

    ``export_to`` (the recipe's ``export``, resolved by the caller) receives a copy of the last stage's
    model, so ``SentenceTransformer(export_to)`` loads the result directly.
    """
    check_recipe(recipe)  # options, inputs and models, before anything is read or trained
    run = Run(recipe, folder)
    if export_to is not None and is_main_process():
        # Refuse a bad export target before anything is deleted or trained.
        export_action(run, Path(export_to), overwrite)
    # One run per folder: a second one would train into the same checkpoints. Held until the run ends.
    lock = contextlib.ExitStack()
    try:
        if is_main_process():
            lock.enter_context(output_lock(run.folder))
        if not overwrite:
            run.evaluation_changed = check_same_settings(run, recipe)
        with main_process_first(run.folder):
            if overwrite and run.folder.exists() and is_main_process():
                clear_run_folder(run.folder)
        handler = add_file_logging(run.folder)
    except BaseException:
        lock.close()
        raise
    try:
        atomic_write_text(run.folder / "recipe.yaml", yaml.safe_dump(recipe.model_dump(), sort_keys=False))
        logger.info("Running recipe %r into %s", recipe.name, run.folder)
        with main_process_first(run.folder):
            # Under torchrun, the first process builds init/ (and trains the tokenizer) alone; the others
            # then load that same folder, so every process starts from identical weights and vocabulary.
            model = initial_model(run)
        outputs: dict[str, Any] = {"init": str(run.init)}
        if recipe.pretrain.enabled:
            model = stage1(run, model)
            outputs["stage1"] = str(run.stage1 / "final")
        if recipe.finetune.enabled:
            model = stage2(run, model)
            outputs["stage2"] = str(run.stage2 / "final")
            if compares_no_pretraining(recipe):
                stage2_only(run)
                outputs["stage2-only"] = str(run.stage2_only / "final")
            elif recipe.evaluation.compare_no_pretraining and not recipe.pretrain.enabled:
                logger.info("evaluation.compare_no_pretraining: stage 1 is off, so stage 2 is that baseline")
        if not is_main_process():
            return outputs  # export and evaluation are single-process work
        if export_to is not None:
            outputs["model"] = str(export_model(run, Path(export_to), overwrite))
        if recipe.evaluation.enabled:
            outputs["report"] = str(evaluation(run, command))
        return outputs
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        lock.close()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def main_process_first(folder: Path) -> contextlib.AbstractContextManager:
    """Under ``torchrun`` / ``accelerate launch``: the first process runs the block, then the others.

    Uses the trainer's own distributed setup (``TrainingArguments.main_process_first``), so the process
    group it creates is the one training uses afterwards. A no-op in a single process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    from retromae_st.pretraining.training import launcher_args

    args = SentenceTransformerTrainingArguments(
        output_dir=str(folder / "checkpoints"), report_to="none", **launcher_args()
    )
    return args.main_process_first(local=False, desc="preparing the run")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat |= _flatten(item, f"{prefix}{key}.")
        return flat
    return {prefix.rstrip("."): value}


def check_same_settings(run: Run, recipe: Recipe) -> list[str]:
    """Refuse to resume a run folder with settings other than those its ``recipe.yaml`` records.

    Otherwise a re-run with, say, another learning rate would continue the first run's checkpoints with
    its own settings and rewrite ``recipe.yaml``: the folder would no longer say how its models were made.
    Keys the stored file lacks (added to the schema since) are not compared. The ``evaluation`` section and
    ``export`` do not change how a model was made: they may differ, and the changed evaluation keys are
    returned so that the report is made again with them.
    """
    stored_path = run.folder / "recipe.yaml"
    if not stored_path.is_file():
        return []
    try:
        stored = yaml.safe_load(stored_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserInputError(
            f"{stored_path} cannot be read ({type(error).__name__}), so this run cannot be resumed safely: "
            "choose another output folder, or pass --overwrite to start afresh."
        ) from None
    # Round-trip the current recipe through YAML so both sides have the same types (tuples, floats).
    current = _flatten(yaml.safe_load(yaml.safe_dump(recipe.model_dump(), sort_keys=False)))
    stored = _flatten(stored) if isinstance(stored, dict) else {}
    changed = [key for key in current if key in stored and stored[key] != current[key]]
    differing = [key for key in changed if not key.startswith(("evaluation.", "export"))]
    if differing:
        shown = ", ".join(f"{key} ({stored[key]!r} -> {current[key]!r})" for key in differing[:5])
        more = f" and {len(differing) - 5} more" if len(differing) > 5 else ""
        raise UserInputError(
            f"{run.folder} holds a run made with other settings: {shown}{more} differ from its recipe.yaml. "
            "Run with the same settings to resume it, choose another output_dir, or pass --overwrite to "
            "start afresh."
        )
    return [key for key in changed if key.startswith("evaluation.")]


def clear_run_folder(folder: Path) -> None:
    """``--overwrite``: remove the earlier run's contents, keeping the lock file this process holds.

    Only a run folder (one with the ``recipe.yaml`` or ``run.log`` a run writes first) is cleared: a
    folder of other files named as ``output_dir`` by mistake is refused, never emptied.
    """
    children = [child for child in folder.iterdir() if child.name != LOCK_FILE]
    if children and not ((folder / "recipe.yaml").is_file() or (folder / "run.log").is_file()):
        raise UserInputError(
            f"{folder} is not empty and is not a retromae-st run folder (no recipe.yaml or run.log), so "
            "--overwrite does not delete it; choose another output_dir / --output."
        )
    for child in children:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def check_inputs(recipe: Recipe) -> None:
    """Fail before anything runs when a local file or folder the recipe names does not exist.

    (Otherwise a typo in ``finetune.train`` or ``evaluation.beir`` would only show after stage 1 trained.)
    Names that may be hub datasets are left to the loaders.
    """
    from retromae_st.data.sources import _looks_like_path

    named: list[tuple[str, str, bool]] = []
    if recipe.pretrain.enabled and recipe.pretrain.corpus != PYTHON_DOCS:
        named.append(("pretrain.corpus", recipe.pretrain.corpus, _looks_like_path(recipe.pretrain.corpus)))
    if recipe.finetune.enabled:
        train = recipe.finetune.train
        if train != PYTHON_DOCS:
            named.append(("finetune.train", train, _looks_like_path(train) or train.lower().endswith(".tsv")))
        if recipe.finetune.dev not in (None, PYTHON_DOCS):
            named.append(("finetune.dev", recipe.finetune.dev, True))  # a BEIR folder: always local
    if recipe.evaluation.enabled:
        named += [("evaluation.beir", b, True) for b in recipe.evaluation.beir if b != PYTHON_DOCS]
    for key, value, local in named:
        if local and not Path(value).expanduser().exists():
            raise UserInputError(
                f"{key}: {value} does not exist; fix the path in the recipe (nothing was run)."
            )


def check_recipe(recipe: Recipe) -> None:
    """Every check of a recipe that needs no training, in seconds: what ``run --check`` runs, and what a
    run does before anything else, so a mistake never shows only after a stage has trained.

    Options first (mask ratios, batch sizes, save_steps, ...: the checks the trainers would make after the
    corpus was read and tokenised), then the inputs (paths exist; corpus files and folders readable; BEIR
    folders have their files and split), then the models (a local folder is a model that loads safely; a
    hub name is in the cache when offline, or known to the hub).
    """
    from retromae_st.data.beir import check_beir_folder
    from retromae_st.data.sources import check_text_source
    from retromae_st.finetuning.train import check_finetune_options
    from retromae_st.models import PRESETS, check_model_available, stage1_learning_rate
    from retromae_st.pretraining.training import check_pretrain_options

    spec = recipe.model
    if recipe.pretrain.enabled:
        stage = recipe.pretrain
        hidden = PRESETS[spec.preset].hidden if spec.preset in PRESETS else None
        _named(
            "pretrain",
            check_pretrain_options,
            loss_kwargs=stage.loss.model_dump(), batch_size=stage.batch_size,
            learning_rate=stage1_learning_rate(stage.learning_rate, spec.preset),
            num_train_epochs=stage.epochs, max_steps=stage.max_steps, warmup_ratio=stage.warmup_ratio,
            weight_decay=stage.weight_decay, max_grad_norm=stage.max_grad_norm,
            gradient_accumulation_steps=stage.gradient_accumulation_steps, save_steps=stage.save_steps,
            logging_steps=stage.logging_steps, bf16=stage.bf16, fp16=stage.fp16,
            dataloader_num_workers=stage.dataloader_num_workers, hidden_size=hidden,
        )  # fmt: skip
    if recipe.finetune.enabled:
        stage2_spec = recipe.finetune
        _named(
            "finetune",
            check_finetune_options,
            batch_size=stage2_spec.batch_size, save_steps=stage2_spec.save_steps,
            eval_steps=stage2_spec.eval_steps, has_evaluator=stage2_spec.dev is not None,
            max_steps=stage2_spec.max_steps, epochs=stage2_spec.epochs, logging_steps=stage2_spec.logging_steps,
            gradient_accumulation_steps=stage2_spec.gradient_accumulation_steps,
            learning_rate=stage2_spec.learning_rate, mini_batch_size=stage2_spec.mini_batch_size,
        )  # fmt: skip
    if (
        spec.preset in PRESETS
        and spec.max_seq_length is not None
        and spec.max_seq_length > PRESETS[spec.preset].max_positions
    ):
        positions = PRESETS[spec.preset].max_positions
        raise UserInputError(
            f"model.max_seq_length={spec.max_seq_length} exceeds the {positions} positions of {spec.preset}: "
            f"use max_seq_length <= {positions}."
        )

    check_inputs(recipe)
    if recipe.pretrain.enabled and recipe.pretrain.corpus != PYTHON_DOCS:
        _named("pretrain.corpus", check_text_source, recipe.pretrain.corpus)
    beir: list[tuple[str, str, str]] = []
    if recipe.finetune.enabled:
        if recipe.finetune.train != PYTHON_DOCS and Path(recipe.finetune.train).expanduser().is_dir():
            beir.append(("finetune.train", recipe.finetune.train, recipe.finetune.split))
        if recipe.finetune.dev not in (None, PYTHON_DOCS):
            beir.append(("finetune.dev", recipe.finetune.dev, recipe.finetune.dev_split))
    if recipe.evaluation.enabled:
        split = recipe.evaluation.split
        beir += [("evaluation.beir", b, split) for b in recipe.evaluation.beir if b != PYTHON_DOCS]
    for key, folder, split in beir:
        _named(key, check_beir_folder, Path(folder).expanduser(), split)

    if spec.name_or_path is not None:
        check_model_available(
            spec.name_or_path, allow_pickle=spec.allow_pickle, max_seq_length=spec.max_seq_length,
            what="model.name_or_path",
        )  # fmt: skip
    if spec.tokenizer is not None and not Path(spec.tokenizer).expanduser().exists():
        from retromae_st.data.sources import _looks_like_path

        if _looks_like_path(spec.tokenizer) or spec.tokenizer.count("/") > 1:
            raise UserInputError(
                f"model.tokenizer: {spec.tokenizer} does not exist; fix the path in the recipe (nothing was run)."
            )
    if recipe.evaluation.enabled:
        for baseline in recipe.evaluation.baselines:
            check_model_available(baseline, what="evaluation.baselines")


def _named(key: str, check: Any, *args: Any, **kwargs: Any) -> None:
    """Run ``check``; a UserInputError it raises is prefixed with the recipe key it is about."""
    try:
        check(*args, **kwargs)
    except UserInputError as error:
        raise UserInputError(f"{key}: {error}") from None


# -- model ----------------------------------------------------------------------------------------------


def initial_model(run: Run) -> SentenceTransformer:
    """The model before training. From scratch, it is written to ``init/`` once (tokenizer included) and
    reloaded on re-runs, so a resumed run continues from the very same starting point."""
    from retromae_st.models import build_model, load_encoder, train_wordpiece_tokenizer

    spec = run.recipe.model
    if spec.name_or_path is not None:
        return load_encoder(
            spec.name_or_path,
            max_seq_length=spec.max_seq_length,
            pooling=spec.pooling,
            trust_remote_code=spec.trust_remote_code,
            allow_pickle=spec.allow_pickle,
        )
    if Run.done(run.init):
        logger.info("Reusing the initial model in %s", run.init)
        return load_own_model(run.init)
    if spec.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, trust_remote_code=spec.trust_remote_code)
    else:
        texts = tokenizer_texts(run)
        logger.info("Training a %d-entry WordPiece tokenizer on %d texts", spec.vocab_size, len(texts))
        tokenizer = train_wordpiece_tokenizer(texts, vocab_size=spec.vocab_size, lowercase=spec.lowercase)
    with atomic_dir(run.init, overwrite=True) as tmp:
        model = build_model(
            spec.preset, tokenizer, max_seq_length=spec.max_seq_length, pooling=spec.pooling,
            save_dir=tmp / "weights", seed=run.recipe.seed, attention_init_gain=spec.attention_init_gain,
        )  # fmt: skip
        model.save_pretrained(str(tmp))
        shutil.rmtree(tmp / "weights")
    return load_own_model(run.init)


def tokenizer_texts(run: Run) -> list[str]:
    """The text a from-scratch tokenizer is trained on: the pretraining corpus, else the training pairs."""
    if run.recipe.pretrain.enabled:
        return run.corpus()["text"]
    if run.recipe.finetune.enabled:
        pairs, _ = pair_datasets(run.recipe, None)
        return [*pairs["anchor"], *pairs["positive"]]
    raise UserInputError(
        "model.preset needs text to train a tokenizer: enable pretrain or finetune, or set model.tokenizer."
    )


# -- stage 1 ---------------------------------------------------------------------------------------------


def corpus_dataset(recipe: Recipe) -> Dataset:
    from retromae_st.data.sources import load_texts

    spec = recipe.pretrain
    if spec.corpus == PYTHON_DOCS:
        from retromae_st.data.python_docs import python_docs_corpus

        dataset = Dataset.from_dict(
            {"text": python_docs_corpus(max_docs=spec.max_documents, seed=recipe.seed)}
        )
        logger.info("Corpus: %d documents of Python's own documentation", len(dataset))
        return dataset
    dataset, stats = load_texts(
        spec.corpus, text_column=spec.text_column, hf_config=spec.hf_config, hf_split=spec.hf_split
    )
    logger.info("Corpus %s: %s", spec.corpus, stats.summary())
    if spec.max_documents is not None and len(dataset) > spec.max_documents:
        dataset = dataset.shuffle(seed=recipe.seed).select(range(spec.max_documents))
    return dataset


def stage1(run: Run, model: SentenceTransformer) -> SentenceTransformer:
    from retromae_st.data.tokenize import tokenize_corpus
    from retromae_st.models import resolve_stage1_learning_rate
    from retromae_st.pretraining.training import pretrain

    final = run.stage1 / "final"
    if Run.done(run.stage1):
        logger.info("Stage 1 is complete (%s): skipped", final)
        return load_own_model(final)
    spec = run.recipe.pretrain
    preset = run.recipe.model.preset
    learning_rate = resolve_stage1_learning_rate(spec.learning_rate, preset, model, "pretrain.learning_rate")
    windows, stats = tokenize_corpus(
        run.corpus(),
        model.tokenizer,
        model.max_seq_length,
        pack=spec.pack,
        cache_dir=run.cache / "tokenized",
    )
    logger.info("Stage 1 data: %s", stats.summary())
    pretrain(
        model,
        windows,
        run.stage1,
        loss_kwargs=spec.loss.model_dump(),
        batch_size=spec.batch_size,
        learning_rate=learning_rate,
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps,
        warmup_ratio=spec.warmup_ratio,
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        gradient_checkpointing=spec.gradient_checkpointing,
        save_steps=spec.save_steps,
        logging_steps=spec.logging_steps,
        seed=run.recipe.seed,
        bf16=spec.bf16,
        fp16=spec.fp16,
        dataloader_num_workers=spec.dataloader_num_workers,
    )
    return model


# -- stage 2 ---------------------------------------------------------------------------------------------


def python_docs_beir(run: Run) -> Path:
    """The quickstart's held-out pairs as a BEIR folder (training passages join as distractors)."""
    from retromae_st.data.python_docs import python_docs_pairs, write_beir

    folder = run.data / "python-docs"
    if not (folder / "qrels").is_dir():
        train, test = python_docs_pairs(seed=run.recipe.seed)
        write_beir(folder, test, distractors=train, overwrite=True)
    return folder


def pair_datasets(recipe: Recipe, run: Run | None) -> tuple[Dataset, Path | None]:
    """(training pairs, dev BEIR folder or None)."""
    from retromae_st.finetuning.pairs import load_pairs

    spec = recipe.finetune
    if spec.train == PYTHON_DOCS:
        from retromae_st.data.python_docs import python_docs_pairs

        train, _ = python_docs_pairs(seed=recipe.seed)
        pairs = Dataset.from_dict(
            {"anchor": [p["query"] for p in train], "positive": [p["passage"] for p in train]}
        )
        if spec.max_pairs is not None and len(pairs) > spec.max_pairs:
            pairs = pairs.shuffle(seed=recipe.seed).select(range(spec.max_pairs))
    else:
        pairs = load_pairs(
            spec.train, split=spec.split, query_column=spec.query_column, positive_column=spec.positive_column,
            hf_config=spec.hf_config, max_pairs=spec.max_pairs, seed=recipe.seed,
        )  # fmt: skip
    dev = None
    if spec.dev is not None:
        dev = python_docs_beir(run) if spec.dev == PYTHON_DOCS and run is not None else Path(spec.dev)
    return pairs, dev


def stage2(run: Run, model: SentenceTransformer) -> SentenceTransformer:
    final = run.stage2 / "final"
    if Run.done(run.stage2):
        logger.info("Stage 2 is complete (%s): skipped", final)
        return load_own_model(final)
    stage1_info = None
    if run.recipe.pretrain.enabled:
        stage1_info = {
            "loss": "RetroMAELoss",
            "corpus": run.recipe.pretrain.corpus,
            **run.recipe.pretrain.loss.model_dump(),
        }
    started_from = str(run.stage1 / "final") if run.recipe.pretrain.enabled else initial_source(run)
    return finetune_stage(run, model, run.stage2, stage1_info=stage1_info, started_from=started_from)


def compares_no_pretraining(recipe: Recipe) -> bool:
    """Whether the run adds ``stage2-only/``: asked for, and there is a stage 1 to do without."""
    spec = recipe.evaluation
    return (
        spec.enabled and spec.compare_no_pretraining and recipe.pretrain.enabled and recipe.finetune.enabled
    )


def initial_source(run: Run) -> str:
    """Where the initial model lives: the run's ``init/`` folder, else the encoder the recipe names."""
    if Run.done(run.init) or run.recipe.model.name_or_path is None:
        return str(run.init)
    return run.recipe.model.name_or_path


def stage2_only(run: Run) -> SentenceTransformer:
    """Stage 2 again, from the initial model instead of stage 1's: the baseline RetroMAE must beat.

    Everything else is stage 2's (data, steps, seed, learning rate, dev selection, hard-negative mining,
    which uses the starting model as in stage 2), so the report's difference is stage 1's doing alone.
    """
    final = run.stage2_only / "final"
    if Run.done(run.stage2_only):
        logger.info("Stage 2 without stage 1 is complete (%s): skipped", final)
        return load_own_model(final)
    logger.info("Stage 2 without stage 1 (evaluation.compare_no_pretraining): from %s", initial_source(run))
    # Stage 1 trained the in-memory initial model in place: reload it (init/ or the named encoder).
    with main_process_first(run.folder):
        model = initial_model(run)
    return finetune_stage(run, model, run.stage2_only, stage1_info=None, started_from=initial_source(run))


def finetune_stage(
    run: Run,
    model: SentenceTransformer,
    folder: Path,
    *,
    stage1_info: dict[str, Any] | None,
    started_from: str,
) -> SentenceTransformer:
    """The recipe's stage 2 on ``model`` into ``folder`` (checkpoints/, final/); resumes a partial run."""
    from retromae_st.finetuning.negatives import mine_negatives
    from retromae_st.finetuning.pairs import dev_evaluator
    from retromae_st.finetuning.train import finetune

    spec = run.recipe.finetune
    pairs, dev = pair_datasets(run.recipe, run)
    logger.info("Stage 2 data: %d training pairs from %s", len(pairs), spec.train)
    if spec.hard_negatives.enabled:
        pairs = mine_negatives(
            pairs, model, num_negatives=spec.hard_negatives.num_negatives, range_max=spec.hard_negatives.range_max,
            relative_margin=spec.hard_negatives.relative_margin,
        )  # fmt: skip
    evaluator = None
    if dev is not None:
        split = "test" if spec.dev == PYTHON_DOCS else spec.dev_split
        evaluator = dev_evaluator(
            dev,
            split=split,
            max_corpus=spec.dev_max_corpus,
            max_queries=spec.dev_max_queries,
            seed=run.recipe.seed,
        )
    return finetune(
        model,
        pairs,
        folder,
        evaluator=evaluator,
        loss=spec.loss,
        mini_batch_size=spec.mini_batch_size,
        batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        epochs=spec.epochs,
        max_steps=spec.max_steps,
        warmup_ratio=spec.warmup_ratio,
        scale=spec.scale,
        eval_steps=spec.eval_steps,
        save_steps=spec.save_steps,
        logging_steps=spec.logging_steps,
        seed=run.recipe.seed,
        bf16=spec.bf16,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        train_dataset_name=spec.train,
        stage1_info=stage1_info,
        started_from=started_from,
    )


EXPORT_MARK = ".retromae-st-export.json"


def _export_source(run: Run) -> Path | None:
    return next(
        (stage / "final" for stage in (run.stage2, run.stage1) if Run.done(stage)),
        run.init if Run.done(run.init) else None,
    )


def _same_model(a: Path, b: Path) -> bool:
    import filecmp

    names = ("modules.json", "model.safetensors")
    return all(
        (a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False) for n in names
    )


def export_action(run: Run, target: Path, overwrite: bool) -> str:
    """``"write"`` or ``"keep"`` (this run's own export, on a re-run); else a :class:`UserInputError`.

    The tool only ever deletes what it wrote: a non-empty target is replaced only with ``overwrite`` and
    only when it is a model folder (one this tool exported, or a Sentence-Transformers model); a folder of
    other files is refused even with ``overwrite``.
    """
    if target.exists() and not target.is_dir():
        raise UserInputError(f"export: {target} is a file, not a folder; choose another export path.")
    if not target.exists() or not any(target.iterdir()):
        return "write"
    mark = target / EXPORT_MARK
    ours = mark.is_file()
    if not ours and not (target / "modules.json").is_file():
        raise UserInputError(
            f"export: {target} is not empty and is not a Sentence-Transformers model folder, so it is not "
            "replaced, even with --overwrite (its files would be lost); choose a new or empty export folder."
        )
    if overwrite:
        return "write"
    if ours:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(mark.read_text(encoding="utf-8")).get("run") == str(run.folder.resolve()):
                return "keep"
    else:
        source = _export_source(run)
        if source is not None and _same_model(source, target):
            return "keep"  # exported by this run before exports were marked
    raise UserInputError(
        f"export: {target} already holds a model that this run did not export: choose another export path, "
        "or pass --overwrite to replace it."
    )


def export_model(run: Run, target: Path, overwrite: bool) -> Path:
    """Copy the last stage's model to ``target`` atomically; see :func:`export_action` for what is kept."""
    source = _export_source(run)
    if source is None:
        raise UserInputError("nothing to export: no stage produced a model.")
    if export_action(run, target, overwrite) == "keep":
        logger.info("The exported model %s exists: kept", target)
        return target
    with atomic_dir(target, overwrite=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        # Marks the folder as this tool's export of this run: a re-run keeps it, --overwrite may replace it.
        atomic_write_json(tmp / EXPORT_MARK, {"run": str(run.folder.resolve()), "source": str(source)})
    logger.info("Exported %s to %s", source, target)
    return target


# -- evaluation ------------------------------------------------------------------------------------------


def evaluation(run: Run, command: str | None) -> Path:
    from retromae_st.evaluation import evaluate
    from retromae_st.evaluation.report import Comparison

    spec = run.recipe.evaluation
    redo = False
    if (run.report / "report.json").is_file():
        if run.evaluation_changed:
            logger.info(
                "The evaluation settings changed (%s): evaluating again (cached embeddings are reused)",
                ", ".join(run.evaluation_changed),
            )
        elif lacks_stage2_only(run):
            # compare_no_pretraining was turned on in a run folder older than the key: the report would hide it.
            logger.info("The report has no stage2-only row: evaluating again (cached embeddings are reused)")
        else:
            logger.info("The report is complete (%s): skipped", run.report)
            return run.report
        redo = True
    models: dict[str, str | SentenceTransformer] = {}
    if spec.compare_untrained and Run.done(run.init):
        models["untrained"] = str(run.init)
    elif spec.compare_untrained and run.recipe.model.name_or_path is not None:
        # An existing encoder is not copied to init/, and stage 1 trained the loaded object in place:
        # load it again as the run started from it (same pooling, length and loading options).
        models["initial"] = initial_model(run)
    if run.recipe.pretrain.enabled:
        models["stage1-retromae"] = str(run.stage1 / "final")
    if run.recipe.finetune.enabled:
        models["stage2-finetuned"] = str(run.stage2 / "final")
    comparisons: list[Comparison] = []
    if compares_no_pretraining(run.recipe) and Run.done(run.stage2_only):
        models["stage2-only"] = str(run.stage2_only / "final")
        comparisons.append(Comparison(NO_PRETRAINING_TITLE, "stage2-finetuned", "stage2-only"))
    for baseline in spec.baselines:
        models[Path(baseline).name or baseline] = baseline
    if not models:
        raise UserInputError("evaluation has no model: enable a stage, compare_untrained, or list baselines.")
    folders = [python_docs_beir(run) if name == PYTHON_DOCS else Path(name) for name in spec.beir]
    logs = {}
    if run.recipe.pretrain.enabled:
        logs["stage1-retromae"] = run.stage1 / "training_log.json"
    if run.recipe.finetune.enabled:
        logs["stage2-finetuned"] = run.stage2 / "final" / "training_log.json"
    if "stage2-only" in models:
        logs["stage2-only"] = run.stage2_only / "final" / "training_log.json"
    evaluate(
        models,
        output_dir=run.report,
        beir_folders=folders,
        mteb_tasks=spec.mteb,
        split=spec.split,
        index=spec.index,
        batch_size=spec.batch_size,
        cache_dir=run.cache / "evaluation",
        training_logs={label: path for label, path in logs.items() if path.is_file()},
        command=command or " ".join(sys.argv),
        config=run.recipe.model_dump(),
        comparisons=comparisons,
        overwrite=redo,
    )
    return run.report


def lacks_stage2_only(run: Run) -> bool:
    """A finished ``stage2-only/`` that the existing report does not show."""
    if not (compares_no_pretraining(run.recipe) and Run.done(run.stage2_only)):
        return False
    try:
        report = json.loads((run.report / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # unreadable: kept as the user's, as before
    return "stage2-only" not in {m.get("label") for m in report.get("models", [])}


def summary_lines(outputs: dict[str, Any], report_dir: Path | None) -> Sequence[str]:
    """What the user reads at the end: where the models and the report are, and the report's comparisons
    (such as RetroMAE stage 1 against none), whose sign is the answer a run is made for."""
    has_report = report_dir is not None and (report_dir / "report.md").is_file()
    # The report folder is named once, by its report.md, below.
    lines = [f"{stage}: {path}" for stage, path in outputs.items() if not (has_report and stage == "report")]
    if has_report:
        from retromae_st.evaluation.report import comparison_line

        lines.append(f"report: {report_dir / 'report.md'}")
        with contextlib.suppress(OSError, ValueError):  # an older or foreign report: no comparisons
            report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
            lines += [comparison_line(item) for item in report.get("comparisons") or []]
    return lines
