"""The trainer on a tiny random GPT-2 (saved and loaded through the directory path, offline).

Covers: local / e2e / e2e+ds / TopK steps lower the loss; the spliced pass equals a plain
run_with_hooks; the LM stays frozen; the blocks before the first SAE run once per step and a local
step stops after its hook; resume == uninterrupted run; a crash while writing a checkpoint leaves
the previous one loadable; Ctrl-C / SIGTERM save a checkpoint.
"""

import json
import os
import signal

import pytest
import torch

import fastsae

from fastsae.train import Trainer, load_config
from fastsae.train import checkpoint as ckpt
from fastsae.train.metrics import read_metrics
from fastsae.train.setup import lr_factor
from helpers_models import random_batches

CTX, BATCH = 16, 4
HOOK = "blocks.1.hook_resid_pre"


def batches(n, seed=0, vocab=250):
    return random_batches(n, BATCH, CTX, seed=seed, vocab=vocab)


def make_config(tmp_path, model_dir, *overrides):
    return load_config({}, [
        f"model.name={model_dir}", f"saes.hooks=[{HOOK}]", "saes.n_latents=64",
        f"optim.batch_size={BATCH}", f"data.context_length={CTX}", f"optim.n_tokens={6 * BATCH * CTX}",
        "optim.warmup_samples=8", "optim.lr=3e-3", "eval.n_tokens=128", "log.every=1", "log.progress=false",
        "log.dead_window_tokens=128", f"run_dir={tmp_path / 'run'}", *overrides])


MODES = {
    "local": ["loss.kl_coeff=0", "loss.local_mse_coeff=1", "loss.sparsity_coeff=6"],
    "e2e": [],
    "e2e+ds": ["loss.kl_coeff=0.5", "loss.downstream_coeff=2.5", "loss.downstream_hooks=[blocks.2.hook_resid_pre]"],
    "topk": ["saes.activation=topk", "saes.k=4", "saes.decoder_norm=project", "loss.local_mse_coeff=1"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_loss_goes_down_on_a_fixed_batch(tmp_path, model_dir, lm, mode):
    trainer = Trainer(make_config(tmp_path, model_dir, *MODES[mode]), model=lm)
    tokens = batches(1)[0]
    history = [trainer.step(tokens) for _ in range(8)]
    # AuxK switches on once latents count as dead (after 128 tokens): judge the other terms.
    main = [m["loss"] - m.get("loss/auxk", 0.0) for m in history]
    assert main[-1] < 0.8 * main[0], main
    last = history[-1]
    for key in ("l0", f"l0/{HOOK}", f"mse/{HOOK}", f"explained_variance/{HOOK}", f"alive/{HOOK}",
                "grad_norm", "lr", "tokens_per_s"):
        assert key in last
    if mode != "local":  # the e2e step reads CE and agreement off the fused KL for free
        assert {"kl", "ce_orig", "ce_sae", "ce_increase", "top1_agreement"} <= set(last)
    if mode == "e2e+ds":
        assert "downstream_mse/blocks.2.hook_resid_pre" in last and "loss/downstream" in last
    if mode == "topk":
        assert last["l0"] == 4 and "loss/auxk" in last  # AuxK runs once some latents are dead
        norms = trainer.saes[HOOK].W_dec.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


@pytest.mark.parametrize("mode", ["e2e", "topk"])
def test_step_through_the_triton_kernels_matches_the_reference(tmp_path, model_dir, lm, mode, monkeypatch):
    """The whole e2e step with every op on its Triton kernel (Triton's interpreter here, the GPU on
    CUDA): same metrics and same SAE weights after two steps as with the PyTorch references."""
    pytest.importorskip("triton")
    tokens = batches(1)[0]
    weights, metrics = {}, {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTSAE_BACKEND", backend)
        torch.manual_seed(0)
        trainer = Trainer(make_config(tmp_path / backend, model_dir, *MODES[mode]), model=lm)
        metrics[backend] = [trainer.step(tokens) for _ in range(2)][-1]
        weights[backend] = {n: p.detach().clone() for n, p in trainer.saes[HOOK].named_parameters()}
    for key in ("loss", "l0", "kl", "ce_sae", f"mse/{HOOK}"):
        assert metrics["triton"][key] == pytest.approx(metrics["torch"][key], rel=1e-3, abs=1e-5), key
    for name, want in weights["torch"].items():
        torch.testing.assert_close(weights["triton"][name], want, atol=1e-4, rtol=1e-3)


def test_spliced_logits_equal_run_with_hooks(tmp_path, model_dir, lm):
    trainer = Trainer(make_config(tmp_path, model_dir, "saes.hooks=[blocks.1.hook_resid_pre, blocks.2.hook_resid_pre]"),
                      model=lm)
    for _ in range(2):  # trained a little, so the SAEs are not at their init
        trainer.step(batches(1)[0])
    tokens = batches(1, seed=5)[0]
    from fastsae.train.objective import Batch

    batch = Batch(tokens, train=False)
    with torch.no_grad():
        _, clean = lm.clean_run(tokens, [trainer.start_hook])
        hidden, _ = lm.spliced_run(tokens, trainer.objective.replacements(batch),
                                   start_hook=trainer.start_hook, start_acts=clean[trainer.start_hook])
        logits = hidden @ lm.W_U + lm.b_U
        hooks = [(h, lambda acts, hook, sae=trainer.saes[h]: sae(acts)) for h in trainer.hooks]
        reference = lm.model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert torch.allclose(logits, reference, atol=1e-5), (logits - reference).abs().max()


def test_lm_is_frozen_and_not_in_the_optimizer(tmp_path, model_dir, lm):
    trainer = Trainer(make_config(tmp_path, model_dir), model=lm)
    trainer.step(batches(1)[0])
    lm_params = list(lm.model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in lm_params)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.params}
    assert not optimized & {id(p) for p in lm_params}
    assert len(trainer.optimizer.state) == 4  # W_enc, b_enc, W_dec, b_dec


def _block_calls_in_one_step(trainer, lm):
    """How many times each block of lm computes during one trainer.step."""
    counts = [0] * lm.n_layers
    handles = []
    for i, block in enumerate(lm.model.blocks):
        # The attention inside the block: a block skipped by a run that starts later may still be
        # called (as an identity), but computes nothing.
        module = getattr(block, "original_component", block).attn

        def count(module, args, output, i=i):
            counts[i] += 1

        handles.append(module.register_forward_hook(count))
    try:
        trainer.step(batches(1)[0])
    finally:
        for h in handles:
            h.remove()
    return counts


def test_e2e_step_runs_the_blocks_before_the_sae_once(tmp_path, model_dir, lm):
    trainer = Trainer(make_config(tmp_path, model_dir, "saes.hooks=[blocks.2.hook_resid_pre]"), model=lm)
    # blocks 0, 1: the clean run only; block 2 (after the SAE): clean + spliced.
    assert _block_calls_in_one_step(trainer, lm) == [1, 1, 2]


def test_local_step_stops_at_the_sae_hook(tmp_path, model_dir, lm):
    trainer = Trainer(make_config(tmp_path, model_dir, *MODES["local"]), model=lm)
    assert _block_calls_in_one_step(trainer, lm) == [1, 0, 0]  # SAE at block 1's input: only block 0 runs


def test_grad_accum_gives_the_same_step(tmp_path, model_dir, lm):
    tokens = batches(1)[0]
    params = []
    for accum in (1, 2):
        trainer = Trainer(make_config(tmp_path, model_dir, f"optim.grad_accum={accum}"), model=lm)
        trainer.step(tokens)
        params.append([p.detach().clone() for p in trainer.params])
    for a, b in zip(*params):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_autocast_and_two_saes(tmp_path, model_dir, lm):
    cfg = make_config(tmp_path, model_dir, "amp=bf16", "saes.hooks=[blocks.0.hook_resid_pre, blocks.2.hook_resid_pre]")
    trainer = Trainer(cfg, model=lm)
    metrics = trainer.step(batches(1)[0])
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if isinstance(v, float))
    assert all(sae.W_enc.dtype == torch.float32 for sae in trainer.saes.values())
    assert all(p.grad is not None for p in trainer.params)


def test_lr_schedule():
    warmup, total = 10, 110
    assert lr_factor(0, warmup, total, 0.1) == 0.0  # the paper's warmup starts at 0
    assert lr_factor(9, warmup, total, 0.1) == pytest.approx(0.9)
    assert lr_factor(10, warmup, total, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, warmup, total, 0.1) == pytest.approx(0.55)
    assert lr_factor(110, warmup, total, 0.1) == pytest.approx(0.1)


# ------------------------------------------------------------------ fit, checkpoints, resume

def _fit(tmp_path, model_dir, lm, data, name, *overrides, **fit_kwargs):
    cfg = make_config(tmp_path, model_dir, f"run_dir={tmp_path / name}", *overrides)
    trainer = Trainer(cfg, model=lm, dataset=data, eval_dataset=batches(2, seed=99))
    return trainer, trainer.fit(**fit_kwargs)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _assert_same_saes(a, b):
    for hook in a.saes:
        for (name, p), q in zip(a.saes[hook].named_parameters(), b.saes[hook].parameters()):
            assert torch.allclose(p, q, atol=1e-6, rtol=0), name


def test_fit_writes_metrics_checkpoint_and_eval(tmp_path, model_dir, lm):
    trainer, final = _fit(tmp_path, model_dir, lm, batches(6), "run", "eval.every=3")
    records = read_metrics(trainer.run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval/kl" in r] == [3, 6]
    assert {"eval/ce_increase", "eval/kl", "loss", "l0"} <= set(final)
    latest = ckpt.latest_checkpoint(trainer.run_dir)
    assert latest.name == "step_00000006"
    saes, state = ckpt.load_checkpoint(latest)
    assert state["step"] == 6 and state["tokens_seen"] == 6 * BATCH * CTX
    assert torch.equal(saes[HOOK].W_enc, trainer.saes[HOOK].W_enc)
    assert (trainer.run_dir / "config.yaml").is_file()


@pytest.mark.parametrize("mode", ["e2e", "topk"])
def test_resume_equals_uninterrupted(tmp_path, model_dir, lm, mode):
    data = batches(6)
    full, _ = _fit(tmp_path, model_dir, lm, data, "full", *MODES[mode])
    part, _ = _fit(tmp_path, model_dir, lm, data, "part", *MODES[mode], max_steps=3)
    assert ckpt.latest_checkpoint(part.run_dir).name == "step_00000003"
    resumed = Trainer.from_run_dir(part.run_dir, model=lm, dataset=data, eval_dataset=batches(2, seed=99))
    assert resumed.step_count == 3
    resumed.fit()
    _assert_same_saes(full, resumed)
    full_losses, resumed_losses = _losses(full.run_dir), _losses(resumed.run_dir)
    assert full_losses.keys() == resumed_losses.keys()
    for step in full_losses:
        assert resumed_losses[step] == pytest.approx(full_losses[step], abs=1e-6)


def test_resume_with_a_token_stream_is_exact(tmp_path, model_dir, lm):
    """The data position comes from TokenStream.state_dict(), not from skipping batches."""
    from helpers_models import TINY_TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT * 30)
    data = ["data.source=text", f"data.path={corpus}"]
    full = Trainer(make_config(tmp_path, model_dir, f"run_dir={tmp_path / 'full'}", *data), model=lm)
    full.fit()
    part = Trainer(make_config(tmp_path, model_dir, f"run_dir={tmp_path / 'part'}", *data), model=lm)
    part.fit(max_steps=4)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(part.run_dir))[1]
    assert state["data"]["windows_consumed"] == 4 * BATCH
    resumed = Trainer.from_run_dir(part.run_dir, model=lm)
    resumed.fit()
    _assert_same_saes(full, resumed)
    assert _losses(full.run_dir) == pytest.approx(_losses(resumed.run_dir), abs=1e-6)


def test_crash_while_writing_a_checkpoint_keeps_the_last_one(tmp_path, model_dir, lm, monkeypatch):
    trainer, _ = _fit(tmp_path, model_dir, lm, batches(6), "run", "checkpoint.every=1", max_steps=2)
    assert ckpt.latest_checkpoint(trainer.run_dir).name == "step_00000002"

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", crash)  # the SAEs are written, then the state fails
    with pytest.raises(OSError, match="simulated"):
        trainer.fit(max_steps=1)
    monkeypatch.undo()
    root = trainer.run_dir / ckpt.CHECKPOINTS
    assert not list(root.glob(".tmp-*"))  # the half-written directory is gone
    latest = ckpt.latest_checkpoint(trainer.run_dir)
    assert latest.name == "step_00000002"
    saes, state = ckpt.load_checkpoint(latest)
    assert state["step"] == 2
    # A process killed mid-write leaves a .tmp- directory: it is never loaded, and cleaned next time.
    (root / ".tmp-step_00000009-x" / "saes").mkdir(parents=True)
    assert ckpt.latest_checkpoint(trainer.run_dir).name == "step_00000002"
    (root / "latest").unlink()  # even without the pointer, the newest complete checkpoint is found
    assert ckpt.latest_checkpoint(trainer.run_dir).name == "step_00000002"


def test_saving_the_same_step_again_never_deletes_the_saved_copy(tmp_path, model_dir, lm, monkeypatch):
    """fit(max_steps) ending on a checkpoint step saves that step twice: the second save must keep
    the complete copy, even if it is interrupted (here: os.rename fails)."""
    trainer, _ = _fit(tmp_path, model_dir, lm, batches(6), "run", "checkpoint.every=2", max_steps=2)
    monkeypatch.setattr(ckpt.os, "rename", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    trainer.save_checkpoint()  # the same step: nothing to rewrite, so nothing is renamed
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(trainer.run_dir)
    assert latest.name == "step_00000002" and ckpt.load_checkpoint(latest)[1]["step"] == 2


def test_resume_after_a_crash_does_not_log_steps_twice(tmp_path, model_dir, lm, monkeypatch):
    data = batches(6)
    save, saves = ckpt.torch.save, []

    def crash_on_the_second_save(*args, **kwargs):  # the save after step 3 dies: a crash
        saves.append(1)
        if len(saves) == 2:
            raise OSError("killed (simulated)")
        return save(*args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", crash_on_the_second_save)
    with pytest.raises(OSError, match="simulated"):
        _fit(tmp_path, model_dir, lm, data, "run", "checkpoint.every=2", max_steps=3)
    monkeypatch.undo()
    trainer_dir = tmp_path / "run"
    assert [r["step"] for r in read_metrics(trainer_dir) if "loss" in r] == [1, 2, 3]
    resumed = Trainer.from_run_dir(trainer_dir, model=lm, dataset=data, eval_dataset=batches(2, seed=99))
    assert resumed.step_count == 2
    resumed.fit()
    steps = [r["step"] for r in read_metrics(trainer_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_eval_reads_the_held_out_data_once(tmp_path, model_dir, lm):
    from helpers_models import TINY_TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT * 30)
    trainer = Trainer(make_config(tmp_path, model_dir, "data.source=text", f"data.path={corpus}",
                                  "data.eval_fraction=0.2", "eval.batch_size=2"), model=lm)
    held_out = trainer._build_stream("eval", 2)
    available = len(held_out.windows) // 2 * 2 * CTX  # full batches of the held-out windows
    with pytest.warns(UserWarning, match="held-out data ran out"):
        metrics = trainer.evaluate(n_tokens=10 * available)
    assert metrics["eval/tokens"] == available


class SignalAfter:
    """A dataset that sends itself a signal while the batch after `after` is being drawn."""

    def __init__(self, data, after, sig):
        self.data, self.after, self.sig = data, after, sig

    def __iter__(self):
        for i, batch in enumerate(self.data):
            if i == self.after:
                os.kill(os.getpid(), self.sig)
            yield batch


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_is_exact(tmp_path, model_dir, lm, sig):
    data = batches(6)
    full, _ = _fit(tmp_path, model_dir, lm, data, "full")
    cfg = make_config(tmp_path, model_dir, f"run_dir={tmp_path / 'stopped'}")
    trainer = Trainer(cfg, model=lm, dataset=SignalAfter(data, 2, sig), eval_dataset=batches(2, seed=99))
    # what was installed before (default_int_handler, or SIG_IGN in a background job)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    # The signal came while batch 3 was drawn: step 3 finished, then the checkpoint was written.
    assert ckpt.latest_checkpoint(trainer.run_dir).name == "step_00000003"
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # handlers restored
    resumed = Trainer.from_run_dir(trainer.run_dir, model=lm, dataset=data, eval_dataset=batches(2, seed=99))
    resumed.fit()
    _assert_same_saes(full, resumed)


def test_keyboard_interrupt_mid_step_saves_the_last_complete_step(tmp_path, model_dir, lm, monkeypatch):
    data = batches(6)
    full, _ = _fit(tmp_path, model_dir, lm, data, "full")
    cfg = make_config(tmp_path, model_dir, f"run_dir={tmp_path / 'cut'}")
    trainer = Trainer(cfg, model=lm, dataset=data, eval_dataset=batches(2, seed=99))
    forward, calls = trainer.objective.__call__, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # inside step 5, before its update
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(trainer, "objective", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert ckpt.latest_checkpoint(trainer.run_dir).name == "step_00000004"
    resumed = Trainer.from_run_dir(trainer.run_dir, model=lm, dataset=data, eval_dataset=batches(2, seed=99))
    resumed.fit()
    _assert_same_saes(full, resumed)


def test_wandb_missing_gives_a_clear_error(tmp_path, model_dir, lm, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = make_config(tmp_path, model_dir, "wandb.project=fastsae-test")
    trainer = Trainer(cfg, model=lm, dataset=batches(6))
    with pytest.raises(ImportError, match="pip install wandb"):
        trainer.fit()


def test_bad_hook_in_config_names_it(tmp_path, model_dir, lm):
    from fastsae.train import ConfigError

    with pytest.raises(ConfigError, match="blocks.9.hook_resid_pre"):
        Trainer(make_config(tmp_path, model_dir, "saes.hooks=[blocks.9.hook_resid_pre]"), model=lm)
    with pytest.raises(ConfigError, match="must come after the last SAE"):
        Trainer(make_config(tmp_path, model_dir, "loss.downstream_coeff=1",
                            "loss.downstream_hooks=[blocks.0.hook_resid_pre]"), model=lm)


def test_saved_sae_records_its_hook(tmp_path, model_dir, lm):
    trainer, _ = _fit(tmp_path, model_dir, lm, batches(6), "run")
    saes = fastsae.load_run(trainer.run_dir)
    assert saes[HOOK].metadata["hook"] == HOOK
    cfg = json.loads((ckpt.latest_checkpoint(trainer.run_dir) / "saes" / HOOK / "cfg.json").read_text())
    assert cfg["n_latents"] == 64


# ---------------------------------------------------------------- run directories (issue 9)


def test_a_used_run_dir_is_refused_and_overwrite_moves_it_aside(tmp_path, model_dir, lm):
    first, _ = _fit(tmp_path, model_dir, lm, batches(6), "run", max_steps=2)
    before = (first.run_dir / "metrics.jsonl").read_text()
    again = Trainer(make_config(tmp_path, model_dir), model=lm, dataset=batches(6))
    with pytest.raises(ckpt.RunDirError, match=r"already holds a run \(checkpoint step_00000002\).*--resume"):
        again.fit()
    assert (first.run_dir / "metrics.jsonl").read_text() == before  # nothing appended, nothing re-pointed
    assert ckpt.latest_checkpoint(first.run_dir).name == "step_00000002"
    fresh = Trainer(make_config(tmp_path, model_dir), model=lm, dataset=batches(6), overwrite=True)
    fresh.fit(max_steps=1)
    (aside,) = tmp_path.glob("run.replaced-*")
    assert (aside / "metrics.jsonl").read_text() == before
    assert [r["step"] for r in read_metrics(fresh.run_dir)] == [1]
    assert _lock_is_free(fresh.run_dir)  # released when fit() returns


def _lock_is_free(run_dir):
    import fcntl

    with open(run_dir / ckpt.LOCK_FILE) as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def _dead_pid():
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("how", ["exception", "kill -9"])
def test_a_run_that_stopped_before_its_first_checkpoint_starts_clean(tmp_path, model_dir, lm, monkeypatch, how):
    import socket

    def crash(*args, **kwargs):
        raise OSError("killed (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", crash)  # the first checkpoint never gets written
    with pytest.raises(OSError, match="simulated"):
        _fit(tmp_path, model_dir, lm, batches(6), "run", max_steps=3)
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3] and ckpt.latest_checkpoint(run_dir) is None
    lock = {"pid": _dead_pid(), "host": socket.gethostname()}
    if how == "kill -9":  # a killed process leaves its lock behind
        (run_dir / ckpt.LOCK_FILE).write_text(json.dumps(lock))
    trainer, _ = _fit(tmp_path, model_dir, lm, batches(6), "run", max_steps=2)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]  # not 1, 2, 3, 1, 2
    # a lock a live process holds is a run in progress: never touched, even with overwrite
    import subprocess
    import sys

    kept = (run_dir / "metrics.jsonl").read_text()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f.fileno(), fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
                               str(run_dir / ckpt.LOCK_FILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ckpt.RunDirError, match="in use by another training process"):
            Trainer(make_config(tmp_path, model_dir), model=lm, dataset=batches(6), overwrite=True).fit()
    finally:
        holder.communicate("")
    assert (run_dir / "metrics.jsonl").read_text() == kept
    with pytest.raises(ckpt.RunDirError, match="in use by another trainer of this process"):
        ckpt.claim_run_dir(run_dir, resume=True)
        ckpt.claim_run_dir(run_dir, resume=True)
    ckpt.release_run_dir(run_dir)


def test_resume_keeps_the_config_and_records_overrides(tmp_path, model_dir, lm):
    import yaml

    part, _ = _fit(tmp_path, model_dir, lm, batches(6), "run", max_steps=2)
    original = (part.run_dir / "config.yaml").read_text()
    resumed = Trainer.from_run_dir(part.run_dir, model=lm, dataset=batches(6),
                                   overrides=["optim.lr=1e-3", "optim.betas=[0.8,0.99]"])
    assert resumed.config.optim.lr == 1e-3
    # the optimizer runs the new lr (at the schedule's factor of step 2) and betas, not the checkpoint's
    factor = lr_factor(2, resumed.config.warmup_steps, 6, resumed.config.optim.min_lr_factor)
    (group,) = resumed.optimizer.param_groups
    assert group["lr"] == pytest.approx(1e-3 * factor) and group["betas"] == (0.8, 0.99)
    resumed.fit(max_steps=1)
    (group,) = resumed.optimizer.param_groups
    assert group["lr"] == pytest.approx(1e-3 * lr_factor(3, resumed.config.warmup_steps, 6,
                                                         resumed.config.optim.min_lr_factor))
    assert (part.run_dir / "config.yaml").read_text() == original
    (record,) = yaml.safe_load((part.run_dir / "overrides.yaml").read_text())
    assert record["step"] == 2 and record["overrides"] == ["optim.lr=1e-3", "optim.betas=[0.8,0.99]"]
    again = Trainer.from_run_dir(part.run_dir, model=lm, dataset=batches(6), overrides=["log.every=2"])
    assert again.config.optim.lr == 1e-3 and again.config.log.every == 2  # earlier overrides still apply
    again.fit(max_steps=1)
    records = yaml.safe_load((part.run_dir / "overrides.yaml").read_text())
    assert [r["step"] for r in records] == [2, 3]


def test_time_based_checkpoints(tmp_path, model_dir, lm):
    # every_minutes so small that every step is due: a checkpoint after each step
    trainer, _ = _fit(tmp_path, model_dir, lm, batches(6), "often", "checkpoint.every_minutes=1e-9",
                      "checkpoint.keep=10")
    steps = sorted(p.name for p in (trainer.run_dir / "checkpoints").glob("step_*"))
    assert steps == [f"step_{i:08d}" for i in range(1, 7)]
    trainer, _ = _fit(tmp_path, model_dir, lm, batches(6), "never", "checkpoint.every_minutes=0", "checkpoint.keep=10")
    assert [p.name for p in (trainer.run_dir / "checkpoints").glob("step_*")] == ["step_00000006"]


def test_every_preset_checkpoints_at_least_every_10_minutes():
    from fastsae.train.config import list_presets

    for name in list_presets():
        minutes = load_config(name).checkpoint.every_minutes
        assert 0 < minutes <= 10, (name, minutes)


def test_progress_off_prints_a_plain_line_every_log_every(tmp_path, model_dir, lm, capsys):
    _fit(tmp_path, model_dir, lm, batches(6), "run", "log.every=2")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fastsae: step")]
    assert [line.split(",")[0] for line in lines] == ["fastsae: step 2/6", "fastsae: step 4/6", "fastsae: step 6/6"]
    assert "loss " in lines[0] and "l0 " in lines[0] and f"tokens {2 * BATCH * CTX:,}" in lines[0]


def test_files_honour_the_umask(tmp_path, model_dir, lm):
    old = os.umask(0o027)
    try:
        trainer, _ = _fit(tmp_path, model_dir, lm, batches(6), "run", max_steps=2)
    finally:
        os.umask(old)
    checked = 0
    for root, dirs, files in os.walk(trainer.run_dir):
        for name in dirs:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o750, name
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o640, name
            checked += 1
    assert checked >= 5  # config, metrics, latest, the SAE's cfg.json + weights, trainer state


def test_datasets_and_dataloaders_passed_to_the_trainer(tmp_path, model_dir, lm):
    datasets = pytest.importorskip("datasets")
    rows = torch.randint(0, 250, (24, CTX))
    train = datasets.Dataset.from_dict({"tokens": rows.tolist()})
    loader = torch.utils.data.DataLoader([{"input_ids": r} for r in rows[:8]], batch_size=BATCH)
    cfg = make_config(tmp_path, model_dir)
    trainer = Trainer(cfg, model=lm, dataset=train, eval_dataset=loader)
    trainer.fit(max_steps=2)
    assert trainer.evaluate()["eval/tokens"] == 8 * CTX
    resumed = Trainer.from_run_dir(trainer.run_dir, model=lm, dataset=train, eval_dataset=loader)
    assert resumed.dataset.state_dict()["examples_consumed"] == 2 * BATCH  # the data position came back
    bad = datasets.Dataset.from_dict({"input_ids": [[lm.d_vocab + 7] * CTX] * BATCH})
    trainer = Trainer(make_config(tmp_path, model_dir, f"run_dir={tmp_path / 'bad'}"), model=lm, dataset=bad)
    with pytest.raises(ValueError, match=rf"Dataset passed as dataset: token id {lm.d_vocab + 7} .* "
                                         rf"vocabulary of {lm.d_vocab}"):
        trainer.fit(max_steps=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_config_error(tmp_path, model_dir):
    from fastsae.train.config import ConfigError

    with pytest.raises(ConfigError, match="device='cuda' but CUDA is not available.*set device=cpu"):
        Trainer(make_config(tmp_path, model_dir, "device=cuda"))


def test_a_directory_fastsae_did_not_make_is_never_cleared(tmp_path, model_dir, lm):
    """Files named like a run's (a config.yaml, a wandb/ folder) in a directory without fastsae's
    lock file belong to the user: training there is refused and nothing is touched."""
    user = tmp_path / "project"
    (user / "wandb" / "run-1").mkdir(parents=True)
    (user / "wandb" / "run-1" / "logs.txt").write_text("mine")
    (user / "config.yaml").write_text("mine: true\n")
    trainer = Trainer(make_config(tmp_path, model_dir, f"run_dir={user}"), model=lm, dataset=batches(6))
    with pytest.raises(ckpt.RunDirError, match="not a fastsae run directory"):
        trainer.fit(max_steps=1)
    assert (user / "config.yaml").read_text() == "mine: true\n"
    assert (user / "wandb" / "run-1" / "logs.txt").read_text() == "mine"


def test_a_half_written_metrics_line_does_not_stop_a_resume(tmp_path, model_dir, lm):
    part, _ = _fit(tmp_path, model_dir, lm, batches(6), "run", max_steps=2)
    with open(part.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # a process killed mid-write
    resumed = Trainer.from_run_dir(part.run_dir, model=lm, dataset=batches(6))
    resumed.fit(max_steps=1)
    assert [r["step"] for r in read_metrics(part.run_dir)] == [1, 2, 3]


def test_a_token_stream_as_eval_data_is_read_from_its_start_each_time(tmp_path, model_dir, lm):
    from fastsae.train.data import ArrayTokenStream

    stream = ArrayTokenStream(torch.randint(0, 250, (4096,)), context_length=CTX, batch_size=BATCH, shuffle=False)
    trainer = Trainer(make_config(tmp_path, model_dir), model=lm, dataset=batches(6), eval_dataset=stream)
    assert trainer.evaluate(write=False) == trainer.evaluate(write=False)
    wrong = ArrayTokenStream(torch.randint(0, 250, (4096,)), context_length=CTX + 1, batch_size=BATCH, shuffle=False)
    with pytest.raises(ValueError, match="dataset is a TokenStream of .* batches; this run reads"):
        Trainer(make_config(tmp_path, model_dir), model=lm, dataset=wrong)  # training batches must match

