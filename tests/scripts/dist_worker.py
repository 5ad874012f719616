"""One rank of a 2-process CPU (gloo) DualPrompt-PGP run: `torchrun --nproc_per_node 2 dist_worker.py OUTDIR`.

`PGP_TINY_METHOD=lora` runs LoRA-PGP instead (default: dualprompt).

Each rank trains the same tiny 2-task continual run with `ContinualTrainer` and writes
`OUTDIR/rank{r}.safetensors` (its memory bases and adapter tensors) and `OUTDIR/rank{r}.json` (its
accuracy matrices, the distributed setup it saw, the labels each evaluation gathered, the number of
memory samples it streamed per task, and how far its bases are from a single-process rebuild).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_cl  # noqa: E402

from pgp_peft.data import collate, memory_subset  # noqa: E402
from pgp_peft.memory import update_memory as pgp_update_memory  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    splits = tiny_cl.make_splits(num_tasks=2, train_per_class=12, test_per_class=5)
    model = tiny_cl.make_model(os.environ.get("PGP_TINY_METHOD", "dualprompt"), num_classes=4)
    trainer = tiny_cl.make_trainer(
        model,
        splits,
        str(Path(out_dir) / "run"),
        optim="adamw_torch",
        learning_rate=0.02,
        weight_decay=0.0,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=3,  # 10 test rows per task over 2 ranks: uneven last batches
        ddp_backend="gloo",
    )

    # Record what every evaluation gathers (labels after gather_for_metrics, on this rank).
    gathered: list[list[int]] = []
    original_gather = trainer.accelerator.gather_for_metrics

    def recording_gather(data, *args, **kwargs):
        out = original_gather(data, *args, **kwargs)
        gathered[-1].extend(int(v) for v in out[2].tolist())
        return out

    trainer.accelerator.gather_for_metrics = recording_gather
    original_evaluate = trainer.evaluate_task

    def evaluate_task(task_id: int):
        gathered.append([])
        return original_evaluate(task_id)

    trainer.evaluate_task = evaluate_task

    # Every rank streams its shard of the memory samples; the bases must equal what one process gets
    # from all of them. Record the shard sizes and compare with a local single-process rebuild.
    memory_rows: list[int] = []
    original_memory_batches = trainer._memory_batches

    def memory_batches(task_id: int):
        loader = original_memory_batches(task_id)
        memory_rows.append(len(loader.dataset))
        return loader

    trainer._memory_batches = memory_batches
    projector_gaps: list[float] = []
    original_update = trainer.update_memory

    def update_memory(task_id: int):
        saved = {k: v.clone() for k, v in model.memory.state_dict().items()}
        rows = memory_subset(splits.train[task_id], model.config.memory_samples, trainer.args.seed + task_id)
        loader = DataLoader(
            trainer._transformed(rows, trainer.memory_transform), batch_size=8, collate_fn=collate
        )
        pgp_update_memory(model, loader, task_id)  # local, no collectives
        single = {name: model.memory.basis(name).double() for name in model.memory.names}
        model.memory.load_state_dict(saved)
        ranks = original_update(task_id)
        gap = 0.0
        for name, basis in single.items():
            ours = model.memory.basis(name).double()
            if ours.shape != basis.shape:
                gap = float("inf")
                break
            gap = max(gap, float((ours @ ours.T - basis @ basis.T).abs().max()))
        projector_gaps.append(gap)
        return ranks

    trainer.update_memory = update_memory

    result = trainer.train_continual()

    tensors = {f"adapter.{k}": v.contiguous() for k, v in model.adapter_state_dict().items()}
    tensors.update(
        {f"basis.{name}": model.memory.basis(name).contiguous().clone() for name in model.memory.names}
    )
    save_file(tensors, str(Path(out_dir) / f"rank{rank}.safetensors"))
    info = {
        "rank": rank,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "accuracy": result.accuracy.to_dict(),
        "task_il_accuracy": result.task_il_accuracy.to_dict(),
        "memory_ranks": result.memory_ranks,
        "gathered_labels": gathered,
        "memory_rows": memory_rows,
        "projector_gaps": projector_gaps,
        "test_labels": [list(map(int, ds["labels"])) for ds in splits.test],
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
