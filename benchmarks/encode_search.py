"""Benchmark: encoding throughput and FAISS search speed/quality.

1. Encoding: a model folder as the pipeline writes it, loaded with ``retromae_st.models.load_encoder``,
   against the same folder loaded as a plain ``SentenceTransformer``; the two must match within noise
   (they are the same stock modules). Runs alternate to spread machine noise over both.
2. Search: exact (``IndexFlatIP``) vs HNSW vs IVF-PQ on ``--vectors`` unit vectors: build time, queries/s
   and Recall@10 against exact search. ``--search-vectors synthetic`` (default) draws clustered random
   vectors; ``--search-vectors model`` encodes real text with the benchmarked model (a trained one, e.g. a
   recipe's ``final/``): the ``--data`` corpus documents, its queries and the documents' sentences, up to
   ``--vectors`` + ``--queries`` distinct texts, the queries drawn at random from them and held out.

Writes ``<output-dir>/<name>.json`` and ``<name>.md``. Example::

    python benchmarks/encode_search.py --data ../shared/data/debian-pkgs            # full run
    python benchmarks/encode_search.py --quick --name encode_search_quick           # smoke run
    python benchmarks/encode_search.py --model quickstart-output/stage2/final --data ../shared/data/debian-pkgs \
        --search-vectors model --name encode_search_real                           # real embeddings
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from retromae_st.data.beir import BeirData, read_corpus, read_queries
from retromae_st.errors import UserInputError
from retromae_st.evaluation.index import build_index, factory_string, recall_vs_exact, timed_search
from retromae_st.io import atomic_write_json, atomic_write_text, ensure_can_write
from retromae_st.models import build_model, load_encoder, train_wordpiece_tokenizer

logger = logging.getLogger("benchmarks.encode_search")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="model folder to benchmark (default: build a retromae-small folder locally)"
    )
    parser.add_argument(
        "--data", help="BEIR folder whose corpus.jsonl supplies the texts (default: synthetic texts)"
    )
    parser.add_argument("--texts", type=int, default=2000, help="texts encoded per run (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per loader (default 3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--vectors", type=int, default=100_000, help="database size for the search benchmark")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=256, help="dimension of synthetic vectors")
    parser.add_argument(
        "--search-vectors",
        choices=["synthetic", "model"],
        default="synthetic",
        help="search over clustered random vectors, or over the model's embeddings of --data texts",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch and faiss threads (default 2)")
    parser.add_argument(
        "--indexes", default="flat,hnsw,ivfpq", help="comma-separated index names or factory strings"
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run (300 texts, 5,000 vectors)")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default=None, help="result file stem (default encode_search[_quick])")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    args = parser.parse_args(argv)
    if args.search_vectors == "model" and not args.data:
        parser.error("--search-vectors model needs --data (a BEIR folder whose texts are encoded)")
    if args.quick:
        args.texts, args.repeats, args.vectors, args.queries = min(args.texts, 300), 2, 5000, 200
    args.name = args.name or ("encode_search_quick" if args.quick else "encode_search")
    return args


def load_texts(data: str | None, count: int) -> list[str]:
    """The first ``count`` documents of a BEIR corpus, or synthetic word salad when no data is given."""
    if data is None:
        rng = np.random.default_rng(0)
        words = [f"w{i}" for i in range(3000)]
        return [" ".join(rng.choice(words, size=int(rng.integers(20, 120)))) for _ in range(count)]
    return beir_documents(data)[:count]


def beir_documents(data: str) -> list[str]:
    """Every document of a BEIR folder as title + text, read and checked by :mod:`retromae_st.data.beir`."""
    corpus = BeirData(read_corpus(data), {}, {}, Path(data).name, None)
    return [corpus.document_text(doc_id) for doc_id in corpus.corpus]


def model_folder(args: argparse.Namespace, texts: list[str], workdir: Path) -> Path:
    if args.model:
        return Path(args.model)
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size=8000)
    folder = workdir / "retromae-small"
    build_model(
        "retromae-small", tokenizer, max_seq_length=args.max_seq_length, save_dir=workdir / "init", seed=0
    ).save(str(folder))
    return folder


def bench_encoding(args: argparse.Namespace, folder: Path, texts: list[str]) -> dict[str, Any]:
    loaders = {
        "retromae_st.load_encoder": lambda: load_encoder(str(folder), max_seq_length=args.max_seq_length),
        "SentenceTransformer": lambda: SentenceTransformer(str(folder), local_files_only=True),
    }
    models = {name: load() for name, load in loaders.items()}
    models["SentenceTransformer"].max_seq_length = args.max_seq_length
    reference = {name: model.encode(texts[:16], batch_size=16) for name, model in models.items()}
    identical = bool(np.allclose(*reference.values(), atol=1e-5))
    for model in models.values():  # warm-up: first calls pay for allocation
        model.encode(texts[: args.batch_size * 2], batch_size=args.batch_size)
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(args.repeats):
        for name, model in models.items():
            begin = time.perf_counter()
            model.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
            times[name].append(time.perf_counter() - begin)
            logger.info("repeat %d %s: %.1f texts/s", repeat + 1, name, len(texts) / times[name][-1])
    rates = {name: [len(texts) / t for t in values] for name, values in times.items()}
    summary = {
        name: {"texts_per_s_median": statistics.median(r), "texts_per_s_runs": r} for name, r in rates.items()
    }
    first, second = (statistics.median(r) for r in rates.values())
    return {
        "model_folder": str(folder),
        "texts": len(texts),
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "same_embeddings": identical,
        "ratio_load_encoder_to_plain": first / second,
        "loaders": summary,
    }


def clustered_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 1,000 random centres: closer to real embeddings than uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 1000, count)] + 0.6 * rng.standard_normal((count, dim)).astype(
        np.float32
    )
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def text_units(data: str, count: int) -> list[str]:
    """Up to ``count`` distinct real texts of a BEIR folder: documents, queries, then documents' sentences."""
    documents = beir_documents(data)
    queries = list(read_queries(data).values()) if (Path(data) / "queries.jsonl").is_file() else []
    sentences = [s.strip() for doc in documents for s in doc.split(". ") if len(s.split()) >= 4]
    # dict.fromkeys: de-duplicate while keeping the order (documents first).
    units = [t for t in dict.fromkeys([*documents, *queries, *sentences]) if t]
    return units[:count]


def model_vectors(args: argparse.Namespace, folder: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """The model's unit embeddings of real texts: (database, held-out queries, description)."""
    texts = text_units(args.data, args.vectors + args.queries)
    if len(texts) < args.queries + 1000:
        raise UserInputError(
            f"{args.data} yields only {len(texts)} distinct texts; lower --vectors/--queries."
        )
    model = load_encoder(str(folder), max_seq_length=args.max_seq_length)
    logger.info("encoding %d texts for the search benchmark", len(texts))
    vectors = model.encode(
        texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=True
    ).astype(np.float32)
    held_out = np.random.default_rng(1).permutation(len(texts))
    queries, database = vectors[held_out[: args.queries]], vectors[held_out[args.queries :]]
    return database, queries, f"embeddings of {Path(args.data).name} texts by {folder}"


def bench_search(args: argparse.Namespace, folder: Path | None = None) -> dict[str, Any]:
    if args.search_vectors == "model":
        database, queries, source = model_vectors(args, folder)
    else:
        database = clustered_vectors(args.vectors, args.dim, seed=0)
        queries = clustered_vectors(args.queries, args.dim, seed=1)
        source = "clustered random unit vectors"
    count, dim = database.shape
    rows, exact_ids = [], None
    for name in args.indexes.split(","):
        begin = time.perf_counter()
        index = build_index(database, name)
        build_s = time.perf_counter() - begin
        _, ids, qps = timed_search(index, queries, 10)
        if exact_ids is None:
            if factory_string(name, count, dim) != "Flat":
                raise UserInputError("--indexes must start with 'flat': it is the reference for Recall@10.")
            exact_ids = ids
        rows.append(
            {
                "index": name,
                "factory": factory_string(name, count, dim),
                "build_s": build_s,
                "queries_per_s": qps,
                "recall@10_vs_exact": recall_vs_exact(ids, exact_ids, 10),
            }
        )
        logger.info(
            "%s: build %.1fs, %.0f q/s, recall@10 %.3f", name, build_s, qps, rows[-1]["recall@10_vs_exact"]
        )
    return {
        "vectors": count,
        "queries": len(queries),
        "dim": dim,
        "data": source,
        "indexes": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    enc, search = result["encoding"], result["search"]
    lines = [
        "# Encoding and search benchmark",
        "",
        f"Machine: {result['machine']}; {result['threads']} threads; torch {result['versions']['torch']}, "
        f"faiss {result['versions']['faiss']}. Command: `{result['command']}`",
        "",
        f"## Encoding ({enc['texts']} texts, batch {enc['batch_size']}, max length {enc['max_seq_length']})",
        "",
        "| loader | texts/s (median) | runs |",
        "|---|---|---|",
    ]
    for name, row in enc["loaders"].items():
        runs = ", ".join(f"{r:.1f}" for r in row["texts_per_s_runs"])
        lines.append(f"| {name} | {row['texts_per_s_median']:.1f} | {runs} |")
    lines += [
        "",
        f"Ratio load_encoder / plain: {enc['ratio_load_encoder_to_plain']:.3f}; identical embeddings: {enc['same_embeddings']}.",
        "",
        f"## Search ({search['vectors']:,} vectors of dim {search['dim']}, {search['queries']} queries, {search['data']})",
        "",
        "| index | factory | build s | queries/s | Recall@10 vs exact |",
        "|---|---|---|---|---|",
    ]
    for row in search["indexes"]:
        lines.append(
            f"| {row['index']} | `{row['factory']}` | {row['build_s']:.1f} | {row['queries_per_s']:.0f} | {row['recall@10_vs_exact']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    output = Path(args.output_dir)
    json_path, md_path = output / f"{args.name}.json", output / f"{args.name}.md"
    try:
        for path in (json_path, md_path):
            ensure_can_write(path, args.overwrite)
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        texts = load_texts(args.data, args.texts)
        with tempfile.TemporaryDirectory(prefix="bench-model-") as workdir:
            folder = model_folder(args, texts, Path(workdir))
            encoding = bench_encoding(args, folder, texts)
            search = bench_search(args, folder)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = {
        "command": " ".join(
            ["python", "benchmarks/encode_search.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "threads": args.threads,
        "versions": {
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "python": platform.python_version(),
        },
        "encoding": encoding,
        "search": search,
    }
    atomic_write_json(json_path, result)
    atomic_write_text(md_path, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
