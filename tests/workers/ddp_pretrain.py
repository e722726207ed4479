"""Run by ``torchrun --nproc_per_node 2`` from tests/test_training.py: RetroMAE pretraining on gloo.

Each rank writes its final encoder and decoder weights to ``<out>/rank<r>.safetensors`` so the test can
check that every process ends with identical weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY, make_texts  # noqa: E402

from retromae_st.data.tokenize import tokenize_corpus  # noqa: E402
from retromae_st.models import build_model, train_wordpiece_tokenizer  # noqa: E402
from retromae_st.pretraining.training import pretrain  # noqa: E402


def main(out: Path, data: str) -> None:
    torch.manual_seed(0)
    texts = make_texts(64, seed=3)
    tokenizer = train_wordpiece_tokenizer(make_texts(), vocab_size=120, min_frequency=1)
    rank = int(os.environ["RANK"])
    # Each rank initialises with its own seed: the trainer (model) and the callback (decoder) must
    # bring them to one state anyway.
    model = build_model(TINY, tokenizer, max_seq_length=64, save_dir=out / f"init{rank}", seed=rank)
    if data == "windows":  # pre-tokenised: PaddingCollator and length-grouped batches
        dataset, _ = tokenize_corpus(Dataset.from_dict({"text": texts}), tokenizer, max_seq_length=64)
    else:  # raw text in random batches of mixed length: the loss splits them into length groups
        dataset = Dataset.from_dict({"text": texts})
    import retromae_st.pretraining.loss as loss_module
    from retromae_st.pretraining.loss import RetroMAELoss

    splits = []
    plan = loss_module.plan_length_groups

    def counting_plan(*args, **kwargs):
        groups = plan(*args, **kwargs)
        splits.append(len(groups))
        return groups

    loss_module.plan_length_groups = counting_plan

    torch.manual_seed(rank)
    loss = RetroMAELoss(model)
    pretrain(
        model, dataset, out / "run", loss=loss, batch_size=8, max_steps=6, learning_rate=1e-3, save_steps=100
    )
    state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    state.update({f"loss.{k}": v.contiguous() for k, v in loss.own_state_dict().items()})
    save_file(state, str(out / f"rank{rank}.safetensors"))
    (out / f"groups{rank}.txt").write_text(" ".join(map(str, splits)))
    dist.barrier()
    dist.destroy_process_group()  # a gloo group left alive can abort the process at exit (pytorch#190489)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "windows")
