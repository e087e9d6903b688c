"""The train state: what an exact resume needs, and the checkpoints that hold it.

Checkpointing is the part of the Trainer that saves and restores it: step, tokens, optimizer and
scheduler, data position, every RNG, the dead-latent trackers, and the SAEs (through
fastsae.train.checkpoint's atomic checkpoint directories). Sharded SAEs are gathered to whole-SAE
shapes, so a checkpoint is the same as an unsharded run's and resumes on any layout.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from fastsae import distributed
from fastsae.train import checkpoint as ckpt


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointing:
    """The Trainer's state_dict / load_state_dict, save_checkpoint / load_checkpoint and
    from_run_dir. It reads the trainer's config, layout, hooks, saes, optimizer, scheduler,
    trackers, dataset, run_dir and its counters (step_count, tokens_seen, _batches_consumed,
    _resume_point, _wandb_id)."""

    def _data_state(self):
        if self.dataset is not None and hasattr(self.dataset, "state_dict"):
            return self.dataset.state_dict()
        return None

    def _latent_dims(self) -> list[int | None]:
        """For each optimizer parameter, the dimension along which it holds latents (None: none)."""
        return [self.saes[hook].latent_dim(name) for hook in self.hooks for name, _ in self.saes[hook].named_parameters()]

    def state_dict(self) -> dict:
        """Everything but the SAE weights that an exact resume needs."""
        data, rng, consumed = self._data_state(), rng_state(), self._batches_consumed
        if self._resume_point is not None:  # interrupted mid-step: the state before its batch
            data, rng, consumed = self._resume_point
        return {
            "step": self.step_count,
            "tokens_seen": self.tokens_seen,
            # sharded SAEs: Adam's moments and the dead-latent counters gathered to whole-SAE shapes
            # (on rank 0), so the checkpoint is the same as an unsharded run's and resumes on any layout
            "optimizer": distributed.gather_optimizer_state(self.optimizer, self._latent_dims(), self.layout),
            "scheduler": self.scheduler.state_dict(),
            "data": data,
            "batches_consumed": consumed,
            "rng": rng,
            # collective under torchrun: every rank's RNG states, and the layout they belong to
            "rng_per_rank": distributed.gather_objects(rng, self.layout),
            "world_size": self.layout.world_size,
            "trackers": {hook: {**t.state_dict(), "since_fired": distributed.gather_latents(
                             t.since_fired, 0, self.layout.shard_group)} for hook, t in self.trackers.items()},
            "wandb_id": self._wandb_id,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step"]
        self.tokens_seen = state["tokens_seen"]
        optimizer_state = state["optimizer"]
        if self.layout.shards > 1:  # the checkpoint holds whole-SAE moments: keep this shard's block
            blocks = [(sae.start, sae.stop) for hook in self.hooks for sae in [self.saes[hook]] for _ in sae.parameters()]
            optimizer_state = distributed.shard_optimizer_state(optimizer_state, self._latent_dims(), blocks)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        # The config's lr and betas win over the checkpoint's, so a resume can change them (--set
        # optim.lr=...): the schedule scales the new lr by the same factor at the same step.
        optim = self.config.optim
        self.scheduler.base_lrs = [optim.lr for _ in self.optimizer.param_groups]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=optim.lr, lr=optim.lr * factor, betas=tuple(optim.betas))
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self._batches_consumed = state["batches_consumed"]
        if state["data"] is not None:
            if self.dataset is None:
                self.dataset = self._build_stream("train", self.config.optim.batch_size)
            self.dataset.load_state_dict(state["data"])
        # Each rank resumes its own RNG. Every data rank reads the same global batches and keeps its
        # rows, so a run also resumes exactly on another number of ranks; the ranks then take
        # rank 0's RNG (training draws nothing per rank).
        per_rank = state.get("rng_per_rank")
        same_layout = per_rank is not None and len(per_rank) == self.layout.world_size
        set_rng_state(per_rank[self.layout.rank] if same_layout else state["rng"])
        for hook, tracker_state in state["trackers"].items():
            if self.layout.shards > 1:
                since = self.saes[hook].local_block(tracker_state["since_fired"], "b_enc")
                tracker_state = {**tracker_state, "since_fired": since}
            self.trackers[hook].load_state_dict(tracker_state)
        self._wandb_id = state.get("wandb_id")

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the run (from rank 0; collective under torchrun, and every rank
        waits until it is on disk). Returns its path (None on the other ranks)."""
        state = self.state_dict()
        saes = self.saes
        if self.layout.shards > 1:  # the whole SAEs, gathered on rank 0
            saes = {hook: sae.gather() for hook, sae in self.saes.items()}
        path = None
        if self.layout.is_main:
            path = ckpt.save_checkpoint(self.run_dir, self.step_count, saes, state, keep=self.config.checkpoint.keep)
        distributed.barrier(self.layout)
        return path

    def load_checkpoint(self, path: str | Path | None = None) -> Path:
        """Restore the SAEs and trainer state from a checkpoint (default: this run's latest)."""
        path = Path(path) if path is not None else ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            raise FileNotFoundError(f"{self.run_dir} has no complete checkpoint to resume from")
        saes, state = ckpt.load_checkpoint(path, device=self.device)
        if sorted(saes) != sorted(self.saes):
            raise ValueError(f"checkpoint {path} has SAEs for {sorted(saes)}, the config for {sorted(self.saes)}")
        with torch.no_grad():
            for hook, sae in saes.items():
                for name in sae.tensor_names():
                    whole, here = getattr(sae, name), getattr(self.saes[hook], name)
                    here.copy_(self.saes[hook].local_block(whole, name) if self.layout.shards > 1 else whole)
        self.load_state_dict(state)
        # a checkpoint of this run directory: fit() continues the run in it (and, once it holds the
        # directory's lock, drops the metrics logged after this checkpoint)
        self._resumed = path.resolve().is_relative_to((self.run_dir / ckpt.CHECKPOINTS).resolve())
        return path

    @classmethod
    def from_run_dir(cls, run_dir, model=None, dataset=None, *, eval_dataset=None,
                     overrides: list[str] | None = None):
        """A trainer for an existing run, restored from its latest checkpoint (for --resume).

        The config is the run's config.yaml with the overrides of its earlier resumes and then
        `overrides`; fit() records these in RUN_DIR/overrides.yaml and leaves config.yaml as it is.
        """
        run_dir = Path(run_dir)
        config = ckpt.load_run_config(run_dir, overrides)
        trainer = cls(config, model, dataset, eval_dataset=eval_dataset, run_dir=run_dir)
        trainer.load_checkpoint()
        trainer._new_overrides = list(overrides or [])
        return trainer
