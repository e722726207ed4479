"""Pretraining corpora: every reader, every bad input, windows, packing, the cache, collator and sampler."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import datasets
import pytest
import torch
from conftest import make_texts
from sentence_transformers.base.sampler import DefaultBatchSampler
from torch.utils.data import RandomSampler

from retromae_st.data import sources as corpus
from retromae_st.data import tokenize as tokenize_module
from retromae_st.data.batching import LengthGroupedBatchSampler, PaddingCollator
from retromae_st.data.sources import CorpusStats, detect_text_format, load_texts
from retromae_st.data.tokenize import special_token_frame, tokenize_corpus
from retromae_st.errors import UserInputError


@pytest.fixture
def hf_cache(tmp_path) -> Path:
    """Keep the datasets cache of each test in its own folder."""
    return tmp_path / "hf-cache"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def texts_of(dataset: datasets.Dataset) -> list[str]:
    return list(dataset["text"])


# ----------------------------------------------------------------------------------------------- readers


def test_lines_file_skips_empty_lines_with_a_count(tmp_path, hf_cache):
    path = tmp_path / "docs.txt"
    path.write_text("alpha beta\n\n   \ngamma\ndelta epsilon\n", encoding="utf-8")
    dataset, stats = load_texts(path, text_format="lines", cache_dir=hf_cache)
    assert texts_of(dataset) == ["alpha beta", "gamma", "delta epsilon"]
    assert stats.documents_read == 5
    assert stats.documents_skipped == {"empty": 2}
    assert stats.documents_kept == 3
    assert "5 documents read" in stats.summary() and "empty: 2" in stats.summary()


def test_paragraph_file_is_detected_and_read_by_paragraph(tmp_path, hf_cache):
    path = tmp_path / "book.txt"
    path.write_text(
        "first para\ncontinues here\n\nsecond para\n\n\nthird para\nwraps\nagain\n", encoding="utf-8"
    )
    assert detect_text_format(path) == "paragraphs"
    dataset, stats = load_texts(path, cache_dir=hf_cache)
    assert [" ".join(text.split()) for text in texts_of(dataset)] == [
        "first para continues here",
        "second para",
        "third para wraps again",
    ]
    assert stats.documents_kept == 3


def test_lines_file_with_a_stray_blank_line_stays_lines(tmp_path, hf_cache):
    path = tmp_path / "lines.txt"
    lines = make_texts(40, seed=1)
    path.write_text("\n".join(lines[:20] + [""] + lines[20:]) + "\n", encoding="utf-8")
    assert detect_text_format(path) == "lines"
    trailing = tmp_path / "trailing.txt"
    trailing.write_text("\n\none\ntwo\nthree\n\n\n", encoding="utf-8")
    assert detect_text_format(trailing) == "lines"
    dataset, stats = load_texts(path, cache_dir=hf_cache)
    assert texts_of(dataset) == lines
    assert stats.documents_skipped == {"empty": 1}


def test_jsonl_joins_titles_and_counts_missing_text(tmp_path, hf_cache):
    path = write_jsonl(
        tmp_path / "docs.jsonl",
        [
            {"text": "body one", "title": "Title One"},
            {"text": "body two"},
            {"text": None, "title": None},
            {"text": "   ", "title": ""},
        ],
    )
    dataset, stats = load_texts(path, cache_dir=hf_cache)
    assert texts_of(dataset) == ["Title One body one", "body two"]
    assert stats.documents_read == 4
    assert stats.documents_skipped == {"missing text": 1, "empty": 1}


def test_json_array_with_custom_column_and_no_titles(tmp_path, hf_cache):
    path = tmp_path / "docs.json"
    path.write_text(
        json.dumps([{"body": "one", "title": "T"}, {"body": "two", "title": "U"}]), encoding="utf-8"
    )
    dataset, _ = load_texts(path, text_column="body", title_column=None, cache_dir=hf_cache)
    assert texts_of(dataset) == ["one", "two"]
    assert dataset.column_names == ["text"]


def test_csv_with_titles(tmp_path, hf_cache):
    path = tmp_path / "docs.csv"
    path.write_text('content,title\n"hello, world",Greeting\nplain text,\n', encoding="utf-8")
    dataset, stats = load_texts(path, text_column="content", cache_dir=hf_cache)
    assert texts_of(dataset) == ["Greeting hello, world", "plain text"]
    assert stats.documents_kept == 2


def test_parquet(tmp_path, hf_cache):
    path = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"text": ["a parquet doc", "another"], "id": [1, 2]}).to_parquet(str(path))
    dataset, _ = load_texts(path, cache_dir=hf_cache)
    assert texts_of(dataset) == ["a parquet doc", "another"]


def test_folder_reads_supported_files_recursively_in_order(tmp_path, hf_cache):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("line a1\nline a2\n", encoding="utf-8")
    write_jsonl(folder / "sub" / "b.jsonl", [{"text": "json b1"}, {"text": "json b2"}])
    (folder / "c.txt").write_text("line c1\n", encoding="utf-8")
    (folder / "README.md").write_text("not a corpus file\n", encoding="utf-8")
    (folder / ".hidden.txt").write_text("hidden\n", encoding="utf-8")
    (folder / "empty.txt").write_text("", encoding="utf-8")
    dataset, stats = load_texts(folder, cache_dir=hf_cache)
    assert sorted(texts_of(dataset)) == ["json b1", "json b2", "line a1", "line a2", "line c1"]
    # Text files keep their sorted order within their group.
    assert texts_of(dataset)[:3] == ["line a1", "line a2", "line c1"]
    assert stats.files == 3
    assert stats.documents_read == 5


def test_beir_folder_joins_title_and_text(tmp_path, hf_cache):
    folder = tmp_path / "beir"
    folder.mkdir()
    write_jsonl(
        folder / "corpus.jsonl",
        [
            {"_id": "d1", "title": "Heading", "text": "the body"},
            {"_id": "d2", "title": "", "text": "untitled"},
        ],
    )
    write_jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "a query that is not a document"}])
    dataset, stats = load_texts(folder, cache_dir=hf_cache)
    assert texts_of(dataset) == ["Heading the body", "untitled"]
    assert stats.documents_read == 2


def test_real_beir_corpus(shared_data, hf_cache):
    dataset, stats = load_texts(shared_data / "cisi", cache_dir=hf_cache)
    first = json.loads((shared_data / "cisi" / "corpus.jsonl").open(encoding="utf-8").readline())
    assert stats.documents_read == 1460
    assert texts_of(dataset)[0] == f"{first['title']} {first['text']}".strip()


# ----------------------------------------------------------------------------------------------- the hub


def test_hub_name_offline_fails_fast_with_a_clear_message(hf_cache):
    start = time.perf_counter()
    with pytest.raises(UserInputError) as error:
        load_texts("retromae-st-test/no-such-dataset-xyz", cache_dir=hf_cache)
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "retromae-st-test/no-such-dataset-xyz" in message
    assert "offline" in message and "local" in message


def test_hub_unreachable_fails_without_retrying(monkeypatch, hf_cache):
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("load_dataset was called although the hub is unreachable")

    monkeypatch.setattr(huggingface_hub, "dataset_info", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    with pytest.raises(UserInputError, match="cannot be reached.*HF_HUB_OFFLINE"):
        load_texts("someone/corpus", cache_dir=hf_cache)


def test_offline_variable_set_after_import_still_refuses_at_once(monkeypatch, hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not try the network"))
    with pytest.raises(UserInputError, match="HF_HUB_OFFLINE is set"):
        load_texts("someone/corpus", cache_dir=hf_cache)


# ----------------------------------------------------------------------------------------------- bad inputs


def test_empty_file(tmp_path, hf_cache):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(UserInputError, match=r"empty\.jsonl is empty"):
        load_texts(path, cache_dir=hf_cache)


def test_only_empty_strings(tmp_path, hf_cache):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n\t\n\n", encoding="utf-8")
    with pytest.raises(UserInputError, match=r"blank\.txt: no documents left \(4 read, all skipped"):
        load_texts(path, text_format="lines", cache_dir=hf_cache)
    jsonl = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(UserInputError, match="no documents left"):
        load_texts(jsonl, cache_dir=hf_cache)


def test_non_utf8_names_file_offset_and_line(tmp_path, hf_cache):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"good line\n" + "caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(UserInputError) as error:
        load_texts(path, cache_dir=hf_cache)
    assert str(path) in str(error.value)
    assert "byte offset 13" in str(error.value) and "line 2" in str(error.value)


def test_utf8_check_is_right_across_read_blocks(tmp_path, monkeypatch):
    # Tiny blocks split multi-byte characters between reads: valid text must pass, the offset must stay exact.
    monkeypatch.setattr(corpus, "_SCAN_BLOCK", 3)
    good = tmp_path / "good.txt"
    good.write_text("é€😀 ok\nnext é\n", encoding="utf-8")
    corpus._check_file(good, "text")
    bad = tmp_path / "bad.txt"
    # The bad byte follows a character split between two blocks, so the decoder holds pending bytes.
    data = "é€😀\nxé".encode() + b"\xffy"
    bad.write_bytes(data)
    offset = data.index(b"\xff")
    with pytest.raises(UserInputError, match=rf"byte offset {offset} \(line 2\)"):
        corpus._check_file(bad, "text")


def test_binary_file_is_refused(tmp_path, hf_cache):
    path = tmp_path / "image.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(UserInputError, match=r"image\.txt looks binary: NUL byte at byte offset 8"):
        load_texts(path, cache_dir=hf_cache)


def test_missing_text_column_lists_the_available_ones(tmp_path, hf_cache):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(
        UserInputError, match=r"docs\.jsonl has no column 'text'; available columns: body, id"
    ):
        load_texts(path, cache_dir=hf_cache)


def test_non_text_column_is_refused(tmp_path, hf_cache):
    path = write_jsonl(tmp_path / "numbers.jsonl", [{"text": 1}, {"text": 2}])
    with pytest.raises(UserInputError, match=r"column 'text' holds .*int64.*not text"):
        load_texts(path, cache_dir=hf_cache)


def test_invalid_json_line_is_named(tmp_path, hf_cache):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(UserInputError, match=r"broken\.jsonl:2: invalid JSON"):
        load_texts(path, cache_dir=hf_cache)


def test_folder_without_matching_files(tmp_path, hf_cache):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "paper.pdf").write_bytes(b"%PDF")
    with pytest.raises(
        UserInputError, match=r"notes has no files to read; it holds 1 other files \(e\.g\. paper\.pdf\)"
    ):
        load_texts(folder, cache_dir=hf_cache)
    (folder / "paper.pdf").unlink()
    with pytest.raises(UserInputError, match="it is empty"):
        load_texts(folder, cache_dir=hf_cache)


def test_path_that_does_not_exist(tmp_path, hf_cache):
    for missing in (tmp_path / "nowhere", "./no-such-corpus.txt", "data/sub/corpus"):
        with pytest.raises(UserInputError, match="does not exist"):
            load_texts(missing, cache_dir=hf_cache)


def test_unknown_extension(tmp_path, hf_cache):
    path = tmp_path / "report.docx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(UserInputError, match=r"report\.docx: unknown file type '\.docx'; supported: \.txt"):
        load_texts(path, cache_dir=hf_cache)


def test_fake_parquet_file(tmp_path, hf_cache):
    path = tmp_path / "fake.parquet"
    path.write_text("text\nnot parquet\n", encoding="utf-8")
    with pytest.raises(UserInputError, match=r"fake\.parquet is not a Parquet file"):
        load_texts(path, cache_dir=hf_cache)


def test_bad_text_format_option(tmp_path):
    with pytest.raises(UserInputError, match="text_format"):
        load_texts(tmp_path, text_format="sentences")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- windows


def bodies(windows: datasets.Dataset, prefix: list[int], suffix: list[int]) -> list[int]:
    """All window contents without their special tokens, concatenated in order."""
    tokens: list[int] = []
    for ids in windows["input_ids"]:
        assert ids[: len(prefix)] == prefix and ids[len(ids) - len(suffix) :] == suffix
        tokens.extend(ids[len(prefix) : len(ids) - len(suffix)])
    return tokens


def test_windows_never_lose_tokens(tokenizer):
    docs = make_texts(30, seed=3) + [" ".join(make_texts(40, seed=4))]  # one document of many windows
    dataset = datasets.Dataset.from_dict({"text": docs})
    windows, stats = tokenize_corpus(dataset, tokenizer, 16)
    expected = [t for doc in docs for t in tokenizer(doc, add_special_tokens=False)["input_ids"]]
    prefix, suffix = special_token_frame(tokenizer)
    assert (prefix, suffix) == ([tokenizer.cls_token_id], [tokenizer.sep_token_id])
    assert bodies(windows, prefix, suffix) == expected
    assert max(windows["length"]) == 16
    assert list(windows["length"]) == [len(ids) for ids in windows["input_ids"]]
    assert stats.tokens == len(expected) and stats.windows == len(windows)
    assert stats.documents_read == 31


def test_packing_fills_windows(tokenizer):
    docs = make_texts(60, seed=5)
    windows, stats = tokenize_corpus(datasets.Dataset.from_dict({"text": docs}), tokenizer, 32, pack=True)
    lengths = list(windows["length"])
    assert all(length == 32 for length in lengths[:-1]) and lengths[-1] <= 32
    joined: list[int] = []
    for doc in docs:
        if joined:
            joined.append(tokenizer.sep_token_id)
        joined.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    assert bodies(windows, [tokenizer.cls_token_id], [tokenizer.sep_token_id]) == joined
    unpacked, _ = tokenize_corpus(datasets.Dataset.from_dict({"text": docs}), tokenizer, 32)
    assert len(windows) < len(unpacked)


def test_hundred_thousand_words_and_a_million_characters(tokenizer):
    words = " ".join(make_texts(8000, seed=6)).split()[:100_000]
    huge_words = " ".join(words)
    million = (huge_words * 2)[:1_000_000]
    assert len(words) == 100_000 and len(million) == 1_000_000
    dataset = datasets.Dataset.from_dict({"text": [huge_words, million]})
    start = time.perf_counter()
    windows, stats = tokenize_corpus(dataset, tokenizer, 128)
    elapsed = time.perf_counter() - start
    per_document = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in (huge_words, million)]
    assert (
        bodies(windows, [tokenizer.cls_token_id], [tokenizer.sep_token_id])
        == per_document[0] + per_document[1]
    )
    # Each document fills windows of 128 - 2 tokens; only its last window may be shorter.
    assert stats.windows == sum(-(-len(ids) // 126) for ids in per_document)
    assert stats.tokens == sum(len(ids) for ids in per_document)
    assert elapsed < 60, f"windowing 2 long documents took {elapsed:.1f} s"


def test_documents_without_tokens_are_counted_once(tokenizer, tmp_path):
    dataset = datasets.Dataset.from_dict({"text": ["retrieval model", "\x01\x02"]})  # control characters only
    given = CorpusStats(source="t", documents_read=2)
    windows, stats = tokenize_corpus(dataset, tokenizer, 16, stats=given, cache_dir=tmp_path)
    assert len(windows) == 1
    assert stats.documents_skipped == {"no tokens": 1} and stats.documents_kept == 1
    assert given.documents_skipped == {} and given.windows == 0  # the caller's stats are not changed
    # Feeding the returned stats back (and hitting the cache) must not count the skip twice.
    _, again = tokenize_corpus(dataset, tokenizer, 16, stats=stats, cache_dir=tmp_path)
    assert again.cached and again.documents_skipped == {"no tokens": 1}


def test_roberta_style_tokenizer_frames_and_long_text_pieces(texts):
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    document = "  ".join(make_texts(50, seed=7)) + "\n" + " ".join(make_texts(50, seed=8))
    # chunk_chars=100 cuts the document into many pieces: they must tokenise as the whole does.
    windows, _ = tokenize_corpus(datasets.Dataset.from_dict({"text": [document]}), tok, 24, chunk_chars=100)
    assert bodies(windows, [0], [2]) == tok(document, add_special_tokens=False)["input_ids"]


def test_bad_window_options(tokenizer):
    dataset = datasets.Dataset.from_dict({"text": ["a document"]})
    with pytest.raises(UserInputError, match="max_seq_length=2 leaves no room"):
        tokenize_corpus(dataset, tokenizer, 2)
    with pytest.raises(UserInputError, match="no 'text' column"):
        tokenize_corpus(dataset.rename_column("text", "body"), tokenizer, 16)


def test_second_call_loads_the_cache_without_tokenising(tmp_path, hf_cache, tokenizer, monkeypatch):
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(make_texts(50, seed=9)) + "\n", encoding="utf-8")
    dataset, stats = load_texts(path, cache_dir=hf_cache)
    first, first_stats = tokenize_corpus(dataset, tokenizer, 16, stats=stats, cache_dir=tmp_path / "tok")
    assert not first_stats.cached

    def must_not_tokenise(*args, **kwargs):
        raise AssertionError("tokenised again although the cache holds the windows")

    monkeypatch.setattr(tokenize_module, "_tokenize_batch", must_not_tokenise)
    reread, stats = load_texts(path, cache_dir=hf_cache)  # same file, same fingerprint
    second, second_stats = tokenize_corpus(reread, tokenizer, 16, stats=stats, cache_dir=tmp_path / "tok")
    assert second_stats.cached and "(from cache)" in second_stats.summary()
    assert second["input_ids"] == first["input_ids"]
    assert (second_stats.windows, second_stats.tokens) == (first_stats.windows, first_stats.tokens)
    # Another window size is another cache entry, so it has to tokenise (and here fails to).
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_corpus(reread, tokenizer, 32, stats=stats, cache_dir=tmp_path / "tok")
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_corpus(reread, tokenizer, 16, pack=True, stats=stats, cache_dir=tmp_path / "tok")
    assert not list((tmp_path / "tok").glob(".tokenising-*")), "scratch files were left behind"


# ----------------------------------------------------------------------------------------------- batching


def test_collator_pads_and_masks(tokenizer):
    collator = PaddingCollator(tokenizer)
    rows = [{"input_ids": [2, 10, 3], "length": 3}, {"input_ids": [2, 11, 12, 13, 3]}, {"input_ids": [2]}]
    batch = collator(rows)
    ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
    assert ids.dtype == torch.long and ids.shape == (3, 5)
    assert mask.sum(1).tolist() == [3, 5, 1]
    assert ids[0].tolist() == [2, 10, 3, 0, 0] and ids[2].tolist() == [2, 0, 0, 0, 0]
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()
    assert torch.equal(batch["text_token_type_ids"], torch.zeros_like(ids))

    wide = PaddingCollator(tokenizer, column="anchor", pad_to_multiple_of=8)(rows)
    assert wide["anchor_input_ids"].shape == (3, 8)
    tensors = PaddingCollator(tokenizer)([{"input_ids": torch.tensor(row["input_ids"])} for row in rows])
    assert torch.equal(tensors["text_input_ids"], ids)


def test_collator_pads_on_the_left_for_left_padding_tokenizers(tokenizer):
    tokenizer_copy = copy.deepcopy(tokenizer)  # the session fixture stays right-padding
    tokenizer_copy.padding_side = "left"
    batch = PaddingCollator(tokenizer_copy)([{"input_ids": [5, 6]}, {"input_ids": [7, 8, 9]}])
    assert batch["text_input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert batch["text_attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]


def lengths_dataset(n: int = 2000, seed: int = 0) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict({"length": torch.randint(4, 129, (n,), generator=generator).tolist()})


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1 - sum(lengths[i] for batch in batches for i in batch) / padded


def test_sampler_is_deterministic_complete_and_changes_per_epoch():
    dataset = lengths_dataset(500)
    first = LengthGroupedBatchSampler(dataset, batch_size=16, drop_last=False, seed=7, mega_batch_factor=4)
    again = LengthGroupedBatchSampler(dataset, batch_size=16, drop_last=False, seed=7, mega_batch_factor=4)
    batches = list(first)
    assert batches == list(again) == list(first)
    assert sorted(i for batch in batches for i in batch) == list(range(500))
    assert len(batches) == len(first) == 32
    first.set_epoch(1)
    assert list(first) != batches
    assert isinstance(first, DefaultBatchSampler)
    # The batch with the longest window comes first, so an out-of-memory batch fails at step one.
    lengths = list(dataset["length"])
    assert max(lengths[i] for i in batches[0]) == max(lengths)

    dropping = LengthGroupedBatchSampler(dataset, batch_size=16, drop_last=True, seed=7, mega_batch_factor=4)
    assert len(list(dropping)) == len(dropping) == 31
    assert all(len(batch) == 16 for batch in dropping)


def test_sampler_pads_much_less_than_random_batches():
    dataset = lengths_dataset()
    lengths = list(dataset["length"])
    grouped = list(LengthGroupedBatchSampler(dataset, batch_size=16, drop_last=False, seed=0))
    generator = torch.Generator().manual_seed(0)
    shuffled = list(
        DefaultBatchSampler(RandomSampler(dataset, generator=generator), batch_size=16, drop_last=False)
    )
    grouped_padding, random_padding = padding_fraction(grouped, lengths), padding_fraction(shuffled, lengths)
    assert random_padding > 0.3
    assert grouped_padding < random_padding / 10, (grouped_padding, random_padding)


def test_collator_and_sampler_train_with_sentence_transformers(tiny_model, tokenizer, tmp_path):
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    seen: list[torch.Size] = []

    class SquaredEmbeddingLoss(torch.nn.Module):
        """A throwaway loss: the real RetroMAE loss lives elsewhere."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, features, labels):
            seen.append(features[0]["input_ids"].shape)
            return self.model(features[0])["sentence_embedding"].pow(2).mean()

    docs = datasets.Dataset.from_dict({"text": make_texts(64, seed=11)})
    windows, _ = tokenize_corpus(docs, tokenizer, 24)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=3,
        batch_sampler=LengthGroupedBatchSampler,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=1,
    )
    trainer = SentenceTransformerTrainer(
        model=tiny_model,
        args=args,
        train_dataset=windows,
        loss=SquaredEmbeddingLoss(tiny_model),
        data_collator=PaddingCollator(tokenizer),
    )
    trainer.train()
    assert len(seen) == 3 and all(shape[0] == 8 and shape[1] <= 24 for shape in seen)


def test_documents_of_unknown_tokens_only_are_dropped_counted_and_reported(tokenizer, tmp_path, caplog):
    # The tokenizer knows only the test vocabulary: Japanese text and symbols are all [UNK].
    texts = ["retrieval model", "日本語のテキスト ☃", "model 日本", "\x01\x02", "ソフトウェア"]
    dataset = datasets.Dataset.from_dict({"text": texts})
    with caplog.at_level("WARNING", logger="retromae_st.data.tokenize"):
        windows, stats = tokenize_corpus(dataset, tokenizer, 16, cache_dir=tmp_path)
    # Partly known text is kept (its known words still teach); all-unknown documents are not windows.
    assert len(windows) == 2 and stats.windows == 2
    assert stats.documents_skipped == {"all unknown tokens": 2, "no tokens": 1} and stats.documents_kept == 2
    assert all(ids.count(tokenizer.unk_token_id) < len(ids) - 2 for ids in windows["input_ids"])
    [warning] = [r.getMessage() for r in caplog.records if "unknown token" in r.getMessage()]
    assert "2 documents" in warning and "[UNK]" in warning and "does not cover" in warning
    assert "all unknown tokens: 2" in stats.summary()
    _, again = tokenize_corpus(dataset, tokenizer, 16, cache_dir=tmp_path)
    assert again.cached and again.documents_skipped == stats.documents_skipped
    only_unknown = datasets.Dataset.from_dict({"text": ["日本語", "☃☃"]})
    with pytest.raises(UserInputError, match="2 were all unknown tokens: the tokenizer does not cover"):
        tokenize_corpus(only_unknown, tokenizer, 16)


def test_check_text_source_is_the_cheap_part_of_load_texts(tmp_path):
    from retromae_st.data.sources import check_text_source

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notes.docx").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "paper.pdf").write_text("x")
    (tmp_path / "ok.txt").write_text("a document\n")
    for name, message in (
        ("missing.txt", "does not exist"),
        ("empty.txt", "is empty"),
        ("notes.docx", "unknown file type '.docx'"),
        ("folder", "has no files to read"),
    ):
        with pytest.raises(UserInputError, match=message):
            check_text_source(tmp_path / name)
    check_text_source(tmp_path / "ok.txt")
    check_text_source("some-owner/some-dataset")  # a hub name: left to the loader
