"""Run by ``torchrun --nproc_per_node 2`` from tests/test_distributed.py: stage 2 (MNRL) on gloo.

Each rank starts from a model initialised with its own seed and writes its final weights to
``<out>/rank<r>.safetensors``, so the test can check that DDP brought every process to one state.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist
from datasets import Dataset
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY, make_texts  # noqa: E402

from retromae_st.finetuning.train import finetune  # noqa: E402
from retromae_st.models import build_model, train_wordpiece_tokenizer  # noqa: E402


def main(out: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rank = int(os.environ["RANK"])
    tokenizer = train_wordpiece_tokenizer(make_texts(), vocab_size=120, min_frequency=1)
    model = build_model(TINY, tokenizer, max_seq_length=32, save_dir=out / f"init{rank}", seed=rank)
    texts = make_texts(64, seed=4)
    pairs = Dataset.from_dict({"anchor": [" ".join(t.split()[:3]) for t in texts], "positive": texts})
    finetune(model, pairs, out / "run", batch_size=8, max_steps=4, save_steps=100, learning_rate=1e-3, seed=0)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()  # a gloo group left alive can abort the process at exit (pytorch#190489)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
