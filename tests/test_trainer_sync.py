"""The training step on a GPU: nothing waits for the device on steps that log nothing, tensor cores
and fused Adam on CUDA.

A host synchronisation (``.item()``, ``float(t)``, a bool-mask index, ``nonzero``) stalls the CPU
until the GPU has drained its queue, so the next step's kernels launch late. There is no GPU here,
so the check is by operator: a TorchDispatchMode records every aten op that would wait for a CUDA
device (reading a scalar back, or an output whose size depends on the data) and the fastsae code
that called it. The ops layer's argument checks (fastsae/ops) read tensors back on CPU only, and
torch's non-fused CPU Adam reads its step counter (fused Adam on CUDA keeps it on the device):
those are not counted.
"""

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastsae.train import Trainer, load_config
from fastsae.train.config import ConfigError
from fastsae.train.metrics import read_metrics as read_records

CTX, BATCH = 16, 4
HOOK = "blocks.1.hook_resid_pre"
REPO = Path(__file__).resolve().parent.parent
aten = torch.ops.aten

# aten ops that wait for a CUDA device: a scalar read back, or an output sized by the data.
_SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal,
             aten._unique2, aten.unique_dim, aten.unique_consecutive}
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class HostSyncRecorder(TorchDispatchMode):
    """Records (aten op, innermost fastsae frame "path:line") for every op that would synchronise."""

    def __init__(self):
        super().__init__()
        self.syncs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        waits = func.overloadpacket in _SYNC_OPS
        if func.overloadpacket in _INDEX_OPS:  # a bool mask index is a nonzero underneath
            waits = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if func.overloadpacket is aten.repeat_interleave:  # tensor repeats: the output size is their sum
            waits = func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
        if waits:
            self.syncs.append((str(func), _caller()))
        return func(*args, **kwargs)


def _caller() -> str:
    """The innermost frame of fastsae code on the stack ("" when the op comes from torch.optim)."""
    frames = traceback.extract_stack()
    if any("torch/optim/" in f.filename for f in frames):
        return ""
    ours = [f for f in frames if f.filename.startswith(str(REPO / "fastsae")) or
            f.filename.startswith(str(REPO / "kernels"))]
    return f"{Path(ours[-1].filename).relative_to(REPO)}:{ours[-1].lineno}" if ours else ""


def _counted(syncs):
    return [(op, where) for op, where in syncs if where and not where.startswith("fastsae/ops/")]


def make_config(tmp_path, model_dir, *overrides):
    return load_config({}, [
        f"model.name={model_dir}", f"saes.hooks=[{HOOK}]", "saes.n_latents=64", f"optim.batch_size={BATCH}",
        f"data.context_length={CTX}", f"optim.n_tokens={7 * BATCH * CTX}", "optim.warmup_samples=8",
        "eval.n_tokens=64", "log.progress=false", f"run_dir={tmp_path / 'run'}", *overrides])


# AuxK (on by default for TopK) gathers the dead latents' encoder columns: a data-sized gather
# that reads the dead count back. It is off here; see fastsae.train.losses.auxk_loss.
MODES = {
    "e2e": [],
    "local": ["loss.kl_coeff=0", "loss.local_mse_coeff=1", "loss.sparsity_coeff=6"],
    "e2e+ds": ["loss.kl_coeff=0.5", "loss.downstream_coeff=2.5", "loss.downstream_hooks=[blocks.2.hook_resid_pre]"],
    "topk": ["saes.activation=topk", "saes.k=4", "saes.decoder_norm=project", "loss.local_mse_coeff=1",
             "loss.auxk_coeff=0"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_step_that_logs_nothing_reads_nothing_back(tmp_path, model_dir, lm, mode):
    trainer = Trainer(make_config(tmp_path, model_dir, "optim.grad_accum=2", *MODES[mode]), model=lm)
    tokens = torch.randint(0, 250, (BATCH, CTX))
    trainer.step_async(tokens)  # first step: lazy state (Adam's moments) is created
    with HostSyncRecorder() as recorder:
        pending = trainer.step_async(tokens)
    assert not _counted(recorder.syncs), f"host synchronisations in a non-logging step: {_counted(recorder.syncs)}"
    metrics = trainer.read_metrics(pending)
    assert metrics["step"] == 2 and isinstance(metrics["loss"], float) and metrics["tokens_per_s"] > 0


def test_the_recorder_sees_a_sync():
    """The recorder itself: the patterns the step must avoid are caught and attributed."""
    fired = torch.zeros(8, dtype=torch.bool)
    with HostSyncRecorder() as recorder:
        float(fired.sum())
        fired[torch.tensor([True] + [False] * 7)] = True
        fired.nonzero()
        fired.masked_fill_(fired, False)  # not a sync
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0]))
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0]), output_size=3)  # not a sync
    assert [op for op, _ in recorder.syncs] == ["aten._local_scalar_dense.default", "aten.index_put_.default",
                                                "aten.nonzero.default", "aten.repeat_interleave.Tensor"]


def test_fit_reads_metrics_on_logging_steps_only(tmp_path, model_dir, lm, monkeypatch):
    """7 steps, log.every=3: metrics are read at steps 3 and 6 and at the last step (7), which
    fit() returns; the records in metrics.jsonl are those steps'."""
    trainer = Trainer(make_config(tmp_path, model_dir, "log.every=3"), model=lm)
    read_at, real_read = [], trainer.read_metrics

    def read_metrics(pending):
        read_at.append(pending.step)
        return real_read(pending)

    monkeypatch.setattr(trainer, "read_metrics", read_metrics)
    result = trainer.fit()
    assert read_at == [3, 6, 7]
    assert result["step"] == 7 and result["tokens"] == 7 * BATCH * CTX
    steps = [r["step"] for r in read_records(trainer.run_dir) if "loss" in r]
    assert steps == [3, 6, 7]


def test_step_returns_the_same_floats_as_a_read_of_step_async(tmp_path, model_dir, lm):
    """step() is step_async() + read_metrics(): same keys, same values for the same state."""
    a = Trainer(make_config(tmp_path / "a", model_dir), model=lm)
    b = Trainer(make_config(tmp_path / "b", model_dir), model=lm)
    tokens = torch.randint(0, 250, (BATCH, CTX))
    got, want = b.read_metrics(b.step_async(tokens)), a.step(tokens)
    assert list(got) == list(want)
    for key in want:
        if key != "tokens_per_s":
            assert got[key] == want[key], key


def test_matmul_precision_is_checked_and_cpu_runs_keep_torchs_setting(tmp_path, model_dir, lm):
    assert make_config(tmp_path, model_dir).matmul_precision == "high"
    with pytest.raises(ConfigError, match="matmul_precision"):
        make_config(tmp_path, model_dir, "matmul_precision=tf32")
    before = torch.get_float32_matmul_precision()
    Trainer(make_config(tmp_path, model_dir, "matmul_precision=medium"), model=lm)
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["high", "highest", "medium"])
def test_cuda_trainer_sets_matmul_precision_and_fuses_adam(tmp_path, model_dir, precision):
    before = torch.get_float32_matmul_precision()
    try:
        trainer = Trainer(make_config(tmp_path, model_dir, "device=cuda", f"matmul_precision={precision}"))
        assert torch.get_float32_matmul_precision() == precision
        assert trainer.optimizer.defaults["fused"] is True
        trainer.step(torch.randint(0, 250, (BATCH, CTX)))
    finally:
        torch.set_float32_matmul_precision(before)
