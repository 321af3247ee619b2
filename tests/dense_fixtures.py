"""Helpers shared by the detection and segmentation tests (imported explicitly)."""
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset


def train_steps(model: torch.nn.Module, dataset: Dataset, collate: Callable, loss_fn: Callable, steps: int,
                lr: float, batch_size: int = 4) -> list:
    """Train ``model`` for ``steps`` AdamW steps on CPU, cycling over ``dataset``; the losses."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    losses = []
    while len(losses) < steps:
        for batch in loader:
            loss, _ = loss_fn(model, batch, torch.device("cpu"))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return losses
