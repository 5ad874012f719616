"""What L2P and DualPrompt share about their key-selected prompt pools: the task-slot prompt mask
and the pull-constraint loss term."""

from __future__ import annotations

import torch
from torch import nn

from ..prompts import PromptSelection


def task_slots(
    method: nn.Module,
    task_id: int | torch.Tensor | None,
    batch: int,
    device: torch.device,
    use_task_slot: bool | None = None,
) -> torch.Tensor | None:
    """The prompt mask: (B, k) pool slots chosen by the task id, or None (select by key).

    While training (or with `use_task_slot=True`) and with `config.prompt_mask`, task t uses the slots
    t·k .. (t+1)·k - 1 (as the reference). When the pool has no such block (more tasks than slots:
    with 20 tasks and a pool of 10, as in the reference's 20-task recipes) later tasks select by key.
    """
    config = method.config
    if use_task_slot is None:
        use_task_slot = method.training
    if task_id is None or not (use_task_slot and config.prompt_mask):
        return None
    top_k = config.top_k
    if isinstance(task_id, torch.Tensor):
        task = task_id.to(device).reshape(-1).expand(batch)
        # Checked on the host: reading back a device tensor would stall the device every step
        # (the ContinualTrainer passes the task as an int; a CPU tensor costs nothing either).
        last = int((task_id if task_id.device.type == "cpu" else task).max())
    else:
        last = int(task_id)
        task = torch.full((batch,), last, dtype=torch.long, device=device)
    if (last + 1) * top_k > config.pool_size:
        return None
    return task.unsqueeze(1) * top_k + torch.arange(top_k, device=device)


def check_query(query: torch.Tensor, batch: int, hidden_size: int) -> torch.Tensor:
    """A precomputed frozen query must be (B, D)."""
    if query.shape != (batch, hidden_size):
        raise ValueError(
            f"query must be (batch, hidden_size) = {(batch, hidden_size)}, got {tuple(query.shape)}"
        )
    return query


def pull_loss(coefficient: float, selection: PromptSelection | None) -> torch.Tensor | None:
    """-coefficient · pull term (the loss subtracts the key-query similarity), or None when it is off."""
    if selection is None or not coefficient:
        return None
    return -coefficient * selection.pull_constraint()
