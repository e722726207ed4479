"""The recipe: one YAML file that describes a whole run, validated against a typed schema first.

A recipe names the model, stage 1 (RetroMAE pretraining), stage 2 (contrastive fine-tuning), the
evaluation and the output folder. It is read with ``yaml.safe_load`` semantics (no Python objects; and
bounded aliases, no recursive ones, no duplicate keys: see :data:`MAX_ALIASES`), then validated by pydantic
models with ``extra="forbid"``: an unknown key or a wrong type is an error that
names the key and its line in the file, before anything runs. Any value can be overridden from the
command line with ``--set stage.key=value``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from retromae_st.errors import UserInputError

# models.PRESET_ATTENTION_INIT_GAIN, repeated so that reading a recipe does not import torch (a test checks
# that the two agree).
PRESET_ATTENTION_INIT_GAIN = 1.0
PYTHON_DOCS = "python-docs"  # the embedded corpus and pairs of the offline quickstart


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


class ModelSection(_Section):
    """Where the encoder comes from: a preset from scratch, or an existing encoder."""

    preset: Literal["retromae-tiny", "retromae-small", "retromae-base"] | None = None
    name_or_path: str | None = Field(default=None, description="existing encoder: a folder or a hub name")
    tokenizer: str | None = Field(
        default=None, description="tokenizer folder or hub name; default: train one"
    )
    vocab_size: int = Field(default=8000, ge=50, description="size of a tokenizer trained on the corpus")
    lowercase: bool = True
    # None = "the model's own": for a preset 128 and CLS (models.PRESET_*); for an existing
    # Sentence-Transformers model its own length and pooling; an explicit value is always honoured.
    max_seq_length: int | None = Field(
        default=None, ge=8, description="default: 128 for a preset, the model's own for name_or_path"
    )
    pooling: Literal["cls", "mean"] | None = Field(
        default=None, description="default: cls for a preset, the model's own for name_or_path"
    )
    attention_init_gain: float | None = Field(
        default=PRESET_ATTENTION_INIT_GAIN,
        gt=0,
        le=10,
        description="a preset's attention value/output projections start at std gain/sqrt(hidden) so that "
        "[CLS] carries the text from the first step; null: BERT's std 0.02 (presets only)",
    )
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.preset is None) == (self.name_or_path is None):
            raise ValueError(
                "set exactly one of model.preset (from scratch) or model.name_or_path (existing encoder)"
            )
        if self.name_or_path is not None and "attention_init_gain" in self.model_fields_set:
            raise ValueError(
                "model.attention_init_gain applies to a preset built from scratch, not to model.name_or_path: "
                "remove it"
            )
        return self


class RetroMAEOptions(_Section):
    encoder_mask_ratio: float = Field(default=0.3, gt=0, lt=1)
    decoder_mask_ratio: float = Field(default=0.5, gt=0, lt=1)
    decoding: Literal["enhanced", "basic"] = "enhanced"
    decoder_layers: int = Field(default=1, ge=1)
    decoder_heads: int | None = Field(default=None, ge=1)
    bow_weight: float = Field(default=0.0, ge=0)
    max_length_groups: int = Field(default=4, ge=1, description="sub-batches of similar length (1: off)")
    head_warmup_steps: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        default="auto",
        description="first steps that train only a fresh MLM head and the decoder, encoder frozen "
        "(auto: up to 50 when the checkpoint has no MLM head; 0: off)",
    )
    head_lr_factor: Literal["auto"] | Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        default="auto",
        description="learning-rate multiple for the decoder and MLM head (auto: 10 when the head is fresh "
        "and the encoder pretrained, else 1)",
    )
    decoder_mask_start: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="decoder-mask curriculum: the decoder mask ratio at step 0, annealed linearly to "
        "decoder_mask_ratio over decoder_mask_steps steps (None: off; 1.0: the decoder sees only h)",
    )
    decoder_mask_steps: int = Field(default=0, ge=0, description="length of the decoder-mask ramp, in steps")
    mean_mix_start: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="from-scratch encoders: weight of the mean-pooled token states in the decoder's input at "
        "step 0, falling linearly to 0 over mean_mix_steps (0: off)",
    )
    mean_mix_steps: int = Field(default=0, ge=0, description="length of the mean-mix ramp, in steps")
    compile: bool = Field(
        default=False,
        description="run the encoder and decoder through torch.compile (masking and losses stay eager)",
    )
    packed: bool | Literal["auto"] = Field(
        default="auto",
        description="run the encoder on the batch's real tokens only, packed into one stream with per-row "
        "attention (BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA, ModernBERT; others: length groups); auto: "
        "where it pays (CUDA, or hidden size >= 256 on CPU)",
    )


class PretrainSection(_Section):
    """Stage 1: RetroMAE pretraining on unlabeled text."""

    enabled: bool = True
    corpus: str = Field(
        default="", description="text files, a folder, a BEIR folder, a hub dataset or 'python-docs'"
    )
    text_column: str = "text"
    hf_config: str | None = None
    hf_split: str = "train"
    max_documents: int | None = Field(default=None, ge=1)
    pack: bool = False
    loss: RetroMAEOptions = RetroMAEOptions()
    batch_size: int = Field(default=32, ge=1)
    learning_rate: Literal["auto"] | Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        default="auto",
        description="peak learning rate; auto: 1e-3 / 5e-4 for retromae-tiny / -small from scratch, else 1e-4, "
        "or 5e-5 for an existing model without a masked-LM head (an embedding model)",
    )
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = -1
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    save_steps: int = Field(default=500, ge=1)
    logging_steps: int = Field(default=10, ge=1)
    bf16: bool = False
    fp16: bool = False
    dataloader_num_workers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _needs_corpus(self) -> PretrainSection:
        if self.enabled and not self.corpus:
            raise ValueError("pretrain.corpus is required when pretrain.enabled is true")
        return self


class HardNegatives(_Section):
    enabled: bool = False
    num_negatives: int = Field(default=1, ge=1)
    range_max: int = Field(default=50, ge=1)
    relative_margin: float | None = 0.05


class FinetuneSection(_Section):
    """Stage 2: MultipleNegativesRankingLoss on (query, positive[, negatives]) pairs."""

    enabled: bool = True
    train: str = Field(default="", description="a BEIR folder, a pair file, a hub dataset or 'python-docs'")
    split: str = "train"
    hf_config: str | None = None
    query_column: str | None = None
    positive_column: str | None = None
    max_pairs: int | None = Field(default=None, ge=1)
    dev: str | None = Field(
        default=None, description="BEIR folder evaluated during training (best checkpoint)"
    )
    dev_split: str = "dev"
    dev_max_corpus: int | None = Field(default=None, ge=1)
    dev_max_queries: int | None = Field(default=None, ge=1)
    hard_negatives: HardNegatives = HardNegatives()
    loss: Literal["mnrl", "cached_mnrl"] = "mnrl"
    mini_batch_size: int = Field(default=32, ge=1)
    scale: float = Field(default=20.0, gt=0)
    batch_size: int = Field(default=64, ge=2)
    learning_rate: float = Field(default=2e-5, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = -1
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    eval_steps: int | None = Field(default=None, ge=1)
    save_steps: int = Field(default=500, ge=1)
    logging_steps: int = Field(default=10, ge=1)
    bf16: bool = False
    gradient_accumulation_steps: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _needs_train(self) -> FinetuneSection:
        if self.enabled and not self.train:
            raise ValueError("finetune.train is required when finetune.enabled is true")
        return self


class EvaluationSection(_Section):
    """Retrieval evaluation of the stage-1 and stage-2 models (and baselines) in one report."""

    enabled: bool = True
    beir: list[str] = Field(
        default_factory=list, description="BEIR folders (or 'python-docs' held-out pairs)"
    )
    split: str = "test"
    mteb: list[str] = Field(default_factory=list, description="MTEB task names (need the hub)")
    baselines: list[str] = Field(default_factory=list, description="other model folders to compare against")
    compare_untrained: bool = True
    compare_no_pretraining: bool = Field(
        default=False,
        description="also run stage 2 from the initial model (no stage 1) and report the difference; "
        "costs a second stage 2",
    )
    index: str = "flat"
    batch_size: int = Field(default=64, ge=1)


class Recipe(_Section):
    """A whole run."""

    name: str = "run"
    output_dir: str = Field(description="where everything is written, relative to the output root")
    export: str | None = Field(
        default=None, description="also write the final model here (relative to the output root)"
    )
    seed: int = 42
    model: ModelSection
    pretrain: PretrainSection = PretrainSection(enabled=False)
    finetune: FinetuneSection = FinetuneSection(enabled=False)
    evaluation: EvaluationSection = EvaluationSection(enabled=False)


# -- loading ------------------------------------------------------------------------------------------


#: A recipe is a few dozen values. These bound what YAML aliases can make of a small file: nested aliases
#: ("billion laughs") expand exponentially when the document is walked, validated or printed.
MAX_ALIASES = 1_000
MAX_NODES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class RecipeYAMLError(yaml.YAMLError):
    """A YAML document the recipe loader refuses, with the 1-based line of the problem (None: unknown)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message, self.line = message, line


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python objects) that refuses recursive aliases and too many aliases.

    PyYAML registers an anchor before composing its content, so ``a: &a [*a]`` makes a node that contains
    itself: every later walk of it recurses forever. Refused here, while composing.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._alias_count = 0
        self._open_anchors: list[str] = []  # anchors whose node is still being composed

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1
            if event.anchor in self._open_anchors:
                raise RecipeYAMLError(
                    f"the alias *{event.anchor} is inside its own anchor &{event.anchor} (a recursive alias); "
                    "a recipe cannot contain itself: write the values out.",
                    line,
                )
            self._alias_count += 1
            if self._alias_count > MAX_ALIASES:
                raise RecipeYAMLError(
                    f"more than {MAX_ALIASES} aliases (*name); a recipe never needs that many: write the "
                    "values out.",
                    line,
                )
            return super().compose_node(parent, index)
        anchor = getattr(event, "anchor", None)
        if anchor is None:
            return super().compose_node(parent, index)
        self._open_anchors.append(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.pop()


def _check_graph(root: yaml.Node, loader: _RecipeLoader) -> None:
    """Refuse a document that expands to over MAX_NODES values, or a mapping with a key twice.

    Each node is visited once (aliases share nodes), so this costs the size of the file, not of its
    expansion. Keys brought in by a merge (``<<: *base``) may be overridden and are not duplicates.
    """
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            _check_duplicate_keys(node, loader)
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise RecipeYAMLError(
                    f"this value expands to more than {MAX_NODES} values through nested aliases (*name); "
                    "a recipe is a few dozen values: write them out instead of nesting aliases.",
                    node.start_mark.line + 1,
                )
        sizes[id(node)] = total
        return total

    size(root)


def _check_duplicate_keys(node: yaml.MappingNode, loader: _RecipeLoader) -> None:
    # Plain YAML loading keeps the last of two equal keys silently; in a recipe that hides a mistake.
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the constructor reports it
            continue
        if first is not None:
            raise RecipeYAMLError(
                f"duplicate key {key!r} (also at line {first}); keep only one of them.", line
            )
        seen[key] = line


def _load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """Safely load one YAML document with the bounds above; (data, composed root node or None)."""
    loader = _RecipeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_graph(root, loader)
        return loader.construct_document(root), root
    finally:
        loader.dispose()


def _line_index(root: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Map each key path in the composed YAML document to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[(*path, str(index))] = item.start_mark.line + 1
                walk(item, (*path, str(index)))

    if root is not None:
        walk(root, ())
    return lines


def _format_errors(error: ValidationError, source: str, lines: dict[tuple[str, ...], int]) -> str:
    messages = []
    for item in error.errors():
        path = tuple(str(part) for part in item["loc"])
        line = next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), None)
        key = ".".join(path) or "(top level)"
        where = f"{source}:{line}" if line else source
        if item["type"] == "extra_forbidden":
            messages.append(
                f"{where}: unknown key {key!r}; check its spelling (see the recipe reference in README)"
            )
        elif item["type"] == "missing":
            messages.append(f"{where}: missing required key {key!r}")
        else:
            messages.append(f"{where}: {key}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(messages)


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar)."""
    if "=" not in assignment:
        raise UserInputError(f"override {assignment!r} must look like section.key=value")
    key, raw = assignment.split("=", 1)
    if not key.strip():
        raise UserInputError(f"override {assignment!r} has no key")
    if not raw.strip():
        return key.strip().split("."), None
    try:
        value, _ = _load_yaml(raw)  # the same bounded safe loading as the file
    except RecursionError:
        raise UserInputError(f"override {assignment!r}: the value is nested too deeply") from None
    except RecipeYAMLError as error:
        raise UserInputError(f"override {assignment!r}: {error.message}") from None
    except yaml.YAMLError as error:
        raise UserInputError(
            f"override {assignment!r}: invalid YAML value: {error}".replace("\n", " ")
        ) from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for assignment in overrides:
        path, value = parse_override(assignment)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserInputError(f"override {assignment!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem is a UserInputError naming key and line."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"recipe {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserInputError(f"{path}: not UTF-8 text (byte {error.start})") from None
    try:
        data, root = _load_yaml(text)
        lines = _line_index(root)
    except RecipeYAMLError as error:
        where = f"{path}:{error.line}" if error.line else str(path)
        raise UserInputError(f"{where}: {error.message}") from None
    except yaml.YAMLError as error:
        raise UserInputError(f"{path}: invalid YAML: {error}".replace("\n", " ")) from None
    except RecursionError:
        # PyYAML composes nested collections recursively; thousands of levels exhaust Python's stack.
        raise UserInputError(
            f"{path}: the YAML is nested too deeply to read; a recipe is a few levels of sections."
        ) from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: a recipe is a mapping of sections (model, pretrain, finetune, ...)")
    data = apply_overrides(data, overrides or [])
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise UserInputError(_format_errors(error, str(path), lines)) from None


def resolve_output(root: str | os.PathLike, output_dir: str) -> Path:
    """The recipe's output folder under ``root``; a recipe cannot write outside the root it is given."""
    root = Path(root).resolve()
    candidate = Path(output_dir)
    if candidate.is_absolute():
        raise UserInputError(
            f"output_dir {output_dir!r} is absolute: recipes name a folder relative to the output root "
            f"({root}); choose the root with --output-root."
        )
    target = (root / candidate).resolve()
    if target != root and root not in target.parents:
        raise UserInputError(f"output_dir {output_dir!r} escapes the output root {root}; remove the '..'.")
    if target == root:
        raise UserInputError("output_dir must name a folder inside the output root, not the root itself.")
    return target


def bundled_recipe(name: str) -> Path:
    """A recipe shipped inside the package (the quickstart), usable from any working directory."""
    return Path(__file__).parent / "bundled" / f"{name}.yaml"
