"""Running a recipe end to end: model -> stage 1 -> stage 2 -> evaluation, resumable.

Layout of a run's output folder::

    run.log                 everything logged, appended across re-runs
    recipe.yaml             the validated recipe as it ran (overrides applied)
    init/                   the initial model (from scratch: random weights + trained tokenizer)
    stage1/                 RetroMAE pretraining: checkpoints/, final/, decoder/, training_log.json
    stage2/                 fine-tuning: checkpoints/, final/ (with training_log.json)
    data/                   derived data (the quickstart's held-out pairs as a BEIR folder)
    cache/                  tokenised corpus and embedding caches
    report/                 report.md, report.json, plots

A stage whose ``final/`` exists is skipped; a stage interrupted mid-way resumes from its last complete
checkpoint; so re-running the same command after a crash continues instead of starting over. Every
folder appears atomically (complete or not at all). ``overwrite=True`` starts the run afresh.
"""

from __future__ import annotations

import contextlib
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
from retromae_st.io import atomic_dir, atomic_write_text
from retromae_st.recipes import PYTHON_DOCS, Recipe

logger = logging.getLogger(__name__)


class Run:
    """The output folder of one recipe run, and the paths of its stages."""

    def __init__(self, recipe: Recipe, folder: str | os.PathLike) -> None:
        self.recipe = recipe
        self.folder = Path(folder)
        self._corpus: Dataset | None = None

    def corpus(self) -> Dataset:
        """The stage-1 corpus, read once per run (the tokenizer and stage 1 both need it)."""
        if self._corpus is None:
            self._corpus = corpus_dataset(self.recipe)
        return self._corpus

    init = property(lambda self: self.folder / "init")
    stage1 = property(lambda self: self.folder / "stage1")
    stage2 = property(lambda self: self.folder / "stage2")
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
    check_inputs(recipe)
    run = Run(recipe, folder)
    with main_process_first(run.folder):
        if overwrite and run.folder.exists() and is_main_process():
            shutil.rmtree(run.folder)
    handler = add_file_logging(run.folder)
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
            save_dir=tmp / "weights", seed=run.recipe.seed,
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
    from retromae_st.pretraining.training import pretrain

    final = run.stage1 / "final"
    if Run.done(run.stage1):
        logger.info("Stage 1 is complete (%s): skipped", final)
        return load_own_model(final)
    spec = run.recipe.pretrain
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
        learning_rate=spec.learning_rate,
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
    from retromae_st.finetuning.negatives import mine_negatives
    from retromae_st.finetuning.pairs import dev_evaluator
    from retromae_st.finetuning.train import finetune

    final = run.stage2 / "final"
    if Run.done(run.stage2):
        logger.info("Stage 2 is complete (%s): skipped", final)
        return load_own_model(final)
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
    stage1_info = None
    if run.recipe.pretrain.enabled:
        stage1_info = {
            "loss": "RetroMAELoss",
            "corpus": run.recipe.pretrain.corpus,
            **run.recipe.pretrain.loss.model_dump(),
        }
    return finetune(
        model,
        pairs,
        run.stage2,
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
    )


def export_model(run: Run, target: Path, overwrite: bool) -> Path:
    """Copy the last stage's model to ``target`` (atomically; an existing export is kept unless overwrite)."""
    source = next(
        (stage / "final" for stage in (run.stage2, run.stage1) if Run.done(stage)),
        run.init if Run.done(run.init) else None,
    )
    if source is None:
        raise UserInputError("nothing to export: no stage produced a model.")
    if (target / "modules.json").is_file() and not overwrite:
        logger.info("The exported model %s exists: kept", target)
        return target
    with atomic_dir(target, overwrite=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    logger.info("Exported %s to %s", source, target)
    return target


# -- evaluation ------------------------------------------------------------------------------------------


def evaluation(run: Run, command: str | None) -> Path:
    from retromae_st.evaluation import evaluate

    spec = run.recipe.evaluation
    if (run.report / "report.json").is_file():
        logger.info("The report is complete (%s): skipped", run.report)
        return run.report
    models: dict[str, str] = {}
    if spec.compare_untrained and Run.done(run.init):
        models["untrained"] = str(run.init)
    if run.recipe.pretrain.enabled:
        models["stage1-retromae"] = str(run.stage1 / "final")
    if run.recipe.finetune.enabled:
        models["stage2-finetuned"] = str(run.stage2 / "final")
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
    )
    return run.report


def summary_lines(outputs: dict[str, Any], report_dir: Path | None) -> Sequence[str]:
    """What the user reads at the end: where the models and the report are."""
    lines = [f"{stage}: {path}" for stage, path in outputs.items()]
    if report_dir is not None and (report_dir / "report.md").is_file():
        lines.append(f"report: {report_dir / 'report.md'}")
    return lines
