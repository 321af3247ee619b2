"""Helpers shared by the detection and segmentation tests (imported explicitly)."""
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
from helpers import REPO, cpu_env
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


def train_recipe(recipe: str, overrides: list, output_dir: Path, run_name: str) -> dict:
    """Run ``launch/train.py configs/RECIPE`` with ``overrides`` on the CPU in a fresh process
    (the way a user starts it) with its run folder in ``output_dir``; its summary.json."""
    subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), str(REPO / "configs" / recipe), *overrides,
                    f"logging.output_dir={output_dir}", f"logging.run_name={run_name}", "logging.progress_bar=false"],
                   check=True, cwd=output_dir.parent, env=cpu_env(), timeout=600)
    return json.loads((output_dir / run_name / "summary.json").read_text())
