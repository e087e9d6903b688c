"""fastsae.distributed on CPU: gloo processes spawned by the test (torch.multiprocessing).

Covers: a 2-shard TopK and ReLU SAE equals the unsharded one (forward, loss, gradients, weights
after several Adam steps, gathered back); the gathered SAE saves and loads as a plain E2ESAE; the
layout of data groups x shards; 2 data-parallel ranks train as one process with the same global
batch (grad_accum too); a rank killed mid-run resumes from the last checkpoint exactly, on 2 ranks
or on 1; the Trainer with saes.shards=2 equals the unsharded run and its checkpoint resumes
unsharded; 2 data x 2 shard groups compose; clear errors for a shard count or batch that does not
divide the processes or the dictionary.
"""

import os

import pytest
import torch

import fastsae
from fastsae.activations import ACTIVATIONS
from fastsae.distributed import Layout, average_gradients, clip_grad_norm_, setup, shard_range
from fastsae.sae import E2ESAE
from fastsae.sharded import ShardedE2ESAE
from fastsae.train import losses
from helpers_distributed import run_ranks

D_IN, N_LATENTS, K, STEPS = 8, 32, 4, 4


def _train(sae, xs, sharded, layout=None):
    """Forward/backward/Adam over xs; returns the per-step losses, first-step gradients, final code."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    history, first_grads = [], None
    for x in xs:
        x = x.clone().requires_grad_(True)
        optimizer.zero_grad()
        out = sae.training_forward(x)
        loss = losses.mse_loss(out.reconstruction, x) + 0.1 * out.sparsity
        loss.backward()
        if sharded:
            average_gradients([sae], layout)
            clip_grad_norm_([sae], 0.5, layout)
        else:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 0.5)
        if first_grads is None:
            first_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
            first_grads["x"] = x.grad.clone()
            first_out = out
        history.append(float(loss))
        optimizer.step()
    return history, first_grads, first_out


def _sharded_equals_whole(rank, world, activation, decoder_norm):
    layout = setup(shards=world)
    torch.manual_seed(0)
    whole = E2ESAE(D_IN, N_LATENTS, activation, decoder_norm=decoder_norm, **ACTIVATIONS[activation].example_params)
    xs = [torch.randn(3, 5, D_IN) for _ in range(STEPS)]
    shard = ShardedE2ESAE.from_full(whole, layout)
    start, stop = shard_range(N_LATENTS, world, rank)

    history, grads, out = _train(shard, xs, True, layout)
    ref_history, ref_grads, ref_out = _train(whole, xs, False)

    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.reconstruction, ref_out.reconstruction, **tol)
    torch.testing.assert_close(out.sparsity, ref_out.sparsity, **tol)
    assert out.l0 == ref_out.l0
    assert torch.equal(out.fire_counts, ref_out.fire_counts[start:stop])  # each shard: its own latents
    if ref_out.code is not None:  # a selection code: the whole SAE's, on every shard (widths may differ)
        torch.testing.assert_close(out.code.to_dense(N_LATENTS), ref_out.code.to_dense(N_LATENTS), **tol)
    torch.testing.assert_close(torch.tensor(history), torch.tensor(ref_history), **tol)
    for name, grad in grads.items():
        dim = None if name == "x" else whole.latent_dim(name)
        want = ref_grads[name] if dim is None else ref_grads[name].narrow(dim, start, stop - start)
        torch.testing.assert_close(grad, want, **tol, msg=lambda m: f"grad {name}: {m}")
    gathered = shard.gather()
    if rank == 0:
        for name in whole.tensor_names():
            torch.testing.assert_close(getattr(gathered, name), getattr(whole, name).detach(), **tol,
                                       msg=lambda m: f"{name} after {STEPS} steps: {m}")
    else:
        assert gathered is None


@pytest.mark.parametrize("activation,decoder_norm", [*((name, "forward") for name in sorted(ACTIVATIONS)),
                                                     ("topk", "project")])
def test_two_shards_equal_the_whole_sae(activation, decoder_norm):
    """The registry's every activation: sharded over 2 ranks, the SAE's training pass, gradients and
    weights after several Adam steps equal the unsharded SAE's."""
    run_ranks(_sharded_equals_whole, 2, activation, decoder_norm)


def _sharded_transcoder_equals_whole(rank, world):
    """A TopK skip-transcoder (d_out != d_in): sharded over the ranks, its training pass against a
    target, gradients (W_skip replicated, as b_dec), Adam steps and gathered weights equal the
    whole one's; drawn() builds its shard (W_skip 0, as the whole init) and from_full round-trips it."""
    from fastsae.spec import SAESpec

    layout = setup(shards=world)
    torch.manual_seed(0)
    whole = E2ESAE(D_IN, N_LATENTS, "topk", K, d_out=D_IN - 2, skip=True)
    with torch.no_grad():
        whole.W_skip.normal_(0, 0.3)
    assert whole.latent_dim("W_skip") is None and "W_skip" in whole.tensor_names()
    shard = ShardedE2ESAE.from_full(whole, layout)
    assert torch.equal(shard.W_skip, whole.W_skip) and shard.W_dec.shape == (N_LATENTS // world, D_IN - 2)
    xs = [torch.randn(3, 5, D_IN) for _ in range(STEPS)]
    targets = [torch.randn(3, 5, D_IN - 2) for _ in range(STEPS)]

    def train(sae, sharded):
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
        grads = None
        for x, target in zip(xs, targets):
            optimizer.zero_grad()
            out = sae.training_forward(x, target=target)
            losses.mse_loss(out.reconstruction, target).backward()
            if sharded:
                average_gradients([sae], layout)
            grads = grads or {name: p.grad.clone() for name, p in sae.named_parameters()}
            optimizer.step()
        return out, grads

    out, grads = train(shard, True)
    ref_out, ref_grads = train(whole, False)
    start, stop = shard_range(N_LATENTS, world, rank)
    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(out.reconstruction, ref_out.reconstruction, **tol)
    for name, grad in grads.items():
        dim = whole.latent_dim(name)
        want = ref_grads[name] if dim is None else ref_grads[name].narrow(dim, start, stop - start)
        torch.testing.assert_close(grad, want, **tol, msg=lambda m, name=name: f"grad {name}: {m}")
    gathered = shard.gather()
    if rank == 0:
        for name in whole.tensor_names():
            torch.testing.assert_close(getattr(gathered, name), getattr(whole, name).detach(), **tol,
                                       msg=lambda m, name=name: f"{name} after {STEPS} steps: {m}")
        assert (gathered.d_out, gathered.skip) == (D_IN - 2, True)
    spec = SAESpec.create(D_IN, N_LATENTS, "topk", k=K, d_out=D_IN - 2, skip=True)
    torch.manual_seed(3)
    drawn = ShardedE2ESAE.drawn(layout, spec)
    torch.manual_seed(3)
    reference = E2ESAE.from_spec(spec)
    gathered = drawn.gather()
    if rank == 0:
        for name in reference.tensor_names():
            torch.testing.assert_close(getattr(gathered, name), getattr(reference, name).detach(), rtol=0, atol=0,
                                       msg=lambda m, name=name: f"drawn {name}: {m}")


def test_two_shards_of_a_skip_transcoder_equal_the_whole_one():
    run_ranks(_sharded_transcoder_equals_whole, 2)


def _sharded_batchtopk_keeps_ties(rank, world):
    from test_activations import batchtopk_tie_case

    layout = setup(shards=world)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        whole, x = batchtopk_tie_case(dtype)
        want, _ = whole.activation_fn.dense_forward(x @ whole.W_enc + whole.b_enc, whole, True)
        shard = ShardedE2ESAE.from_full(whole, layout).train()
        got = shard.training_forward(x).code.to_dense(whole.n_latents)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{dtype}: {m}")


def test_two_shards_keep_every_batchtopk_tie():
    """BatchTopK ties at the threshold, sharded over 2 ranks (each shard's candidates widen)."""
    run_ranks(_sharded_batchtopk_keeps_ties, 2)


def _save_gathered(rank, world, directory):
    layout = setup(shards=world)
    torch.manual_seed(1)
    whole = E2ESAE(D_IN, N_LATENTS, "topk", K)
    path = ShardedE2ESAE.from_full(whole, layout).save_pretrained(directory)
    if rank == 0:
        loaded = E2ESAE.from_pretrained(path)
        for name, param in whole.named_parameters():
            assert torch.equal(getattr(loaded, name), param.detach()), name
    else:
        assert path is None


def test_sharded_sae_saves_a_whole_sae(tmp_path):
    run_ranks(_save_gathered, 2, str(tmp_path / "sae"))


def _layout_and_errors(rank, world):
    layout = setup(shards=1)
    assert (layout.data_size, layout.data_rank, layout.shard_rank) == (world, rank, 0)
    assert layout.is_main == (rank == 0)
    with pytest.raises(ValueError, match="saes.shards=3 must divide the number of processes"):
        setup(shards=3)


def test_layout_and_shard_count_errors():
    run_ranks(_layout_and_errors, 2)


def test_single_process_layout_and_errors(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup(shards=1) == Layout()
    with pytest.raises(ValueError, match="needs 2 processes"):
        setup(shards=2)
    with pytest.raises(ValueError, match="divisible by saes.shards=3"):
        shard_range(32, 3, 0)
    layout = Layout(rank=5, world_size=8, shards=4)
    assert (layout.data_rank, layout.shard_rank, layout.data_size) == (1, 1, 2)


# ------------------------------------------------------------------ data parallel training

CTX, BATCH, HOOK = 16, 4, "blocks.1.hook_resid_pre"
N_STEPS = 6


def global_batches(n=N_STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (BATCH, CTX), generator=g) for _ in range(n)]


def dp_config(model_dir, run_dir, *overrides):
    from fastsae.train import load_config

    return load_config({}, [
        f"model.name={model_dir}", f"saes.hooks=[{HOOK}]", "saes.n_latents=64", f"optim.batch_size={BATCH}",
        f"data.context_length={CTX}", f"optim.n_tokens={N_STEPS * BATCH * CTX}", "optim.warmup_samples=4",
        "optim.lr=3e-3", "eval.n_tokens=64", "eval.batch_size=4", "log.every=1", "log.progress=false",
        "log.dead_window_tokens=64", "checkpoint.every=2", f"run_dir={run_dir}", "device=cpu", *overrides])


class KillAt:
    """Token batches that SIGKILL the process of `rank` when it draws batch number `at` (a rank
    that dies mid-run, as on a lost node)."""

    def __init__(self, batches, rank, at):
        self.batches, self.rank, self.at = batches, rank, at

    def __iter__(self):
        import signal

        for i, batch in enumerate(self.batches):
            if i == self.at and int(os.environ["RANK"]) == self.rank:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch


def _dp_steps(rank, world, model_dir, out, overrides):
    from fastsae.train import Trainer

    trainer = Trainer(dp_config(model_dir, f"{out}.run", *overrides), model=str(model_dir))
    history = [trainer.step(batch) for batch in global_batches()]
    weights = {n: p.detach().clone() for n, p in trainer.saes[HOOK].named_parameters()}
    torch.save({"history": history, "weights": weights}, f"{out}.rank{rank}")


def _single_steps(model_dir, run_dir, overrides=()):
    from fastsae.train import Trainer

    trainer = Trainer(dp_config(model_dir, run_dir, *overrides), model=str(model_dir))
    history = [trainer.step(batch) for batch in global_batches()]
    return history, {n: p.detach().clone() for n, p in trainer.saes[HOOK].named_parameters()}


# AuxK is off in the TopK case: its loss is normalised by the variance of each rank's own
# micro-batch (as under DDP in sparsify), so it is not a mean over tokens that ranks can split.
@pytest.mark.parametrize("overrides", [[], ["optim.grad_accum=2", "saes.activation=topk", "saes.k=4",
                                            "loss.auxk_coeff=0"]], ids=["relu", "topk-grad-accum"])
def test_two_data_ranks_equal_one_process_with_the_same_global_batch(tmp_path, model_dir, overrides):
    run_ranks(_dp_steps, 2, model_dir, str(tmp_path / "dp"), overrides)
    history, weights = _single_steps(model_dir, tmp_path / "single", overrides)
    for rank in range(2):
        got = torch.load(tmp_path / f"dp.rank{rank}", weights_only=False)
        for step, (a, b) in enumerate(zip(got["history"], history)):
            for key in ("loss", "kl", "l0", f"mse/{HOOK}", "grad_norm", f"dead/{HOOK}"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (rank, step, key)
            assert a["tokens"] == b["tokens"]  # tokens count the global batch
        for name, want in weights.items():
            torch.testing.assert_close(got["weights"][name], want, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {rank} {name}: {m}")


def _dp_fit(rank, world, model_dir, run_dir, kill):
    from fastsae.train import Trainer

    batches = global_batches()
    data = KillAt(batches, rank=1, at=5) if kill else batches
    trainer = Trainer(dp_config(model_dir, run_dir), model=str(model_dir), dataset=data)
    trainer.fit()


def _dp_resume(rank, world, model_dir, run_dir):
    from fastsae.train import Trainer

    trainer = Trainer.from_run_dir(run_dir, model=str(model_dir), dataset=global_batches())
    assert trainer.step_count == 4  # the last checkpoint before rank 1 died at its 6th batch
    trainer.fit()


def test_a_killed_rank_resumes_from_the_last_checkpoint_exactly(tmp_path, model_dir):
    """Resumed on 2 ranks: bitwise the uninterrupted 2-rank run. Resumed on 1 process (a copy of
    the same run directory): the one-process run, to fp32 tolerance."""
    import shutil

    from fastsae.train import Trainer
    from fastsae.train import checkpoint as ckpt
    from fastsae.train.metrics import read_metrics

    run_ranks(_dp_fit, 2, model_dir, str(tmp_path / "whole"), False)
    with pytest.raises(Exception):  # rank 1 dies at batch 6; rank 0 fails in the next all-reduce
        run_ranks(_dp_fit, 2, model_dir, str(tmp_path / "killed"), True)
    assert int(ckpt.latest_checkpoint(tmp_path / "killed").name.split("_")[1]) == 4
    shutil.copytree(tmp_path / "killed", tmp_path / "killed-copy")
    run_ranks(_dp_resume, 2, model_dir, str(tmp_path / "killed"))

    whole = fastsae.load_run(tmp_path / "whole")[HOOK]
    resumed = fastsae.load_run(tmp_path / "killed")[HOOK]
    for name, param in whole.named_parameters():
        assert torch.equal(getattr(resumed, name), param), name
    losses_whole = [m["loss"] for m in read_metrics(tmp_path / "whole") if "loss" in m]
    losses_resumed = [m["loss"] for m in read_metrics(tmp_path / "killed") if "loss" in m]
    assert losses_resumed == losses_whole and len(losses_whole) == N_STEPS

    one_process = Trainer.from_run_dir(tmp_path / "killed-copy", model=str(model_dir), dataset=global_batches())
    one_process.fit()
    _, weights = _single_steps(model_dir, tmp_path / "single")
    for name, param in fastsae.load_run(tmp_path / "killed-copy")[HOOK].named_parameters():
        torch.testing.assert_close(param, weights[name], rtol=1e-4, atol=1e-6)


def _batch_not_divisible(rank, world, model_dir, run_dir):
    from fastsae.train import Trainer
    from fastsae.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim.batch_size=4 must be divisible by the data ranks \(2 = 2 "
                                          r"processes / saes.shards=1\) x optim.grad_accum \(4\)"):
        Trainer(dp_config(model_dir, run_dir, "optim.grad_accum=4"), model=str(model_dir))


def test_a_batch_the_ranks_cannot_split_is_refused(tmp_path, model_dir):
    run_ranks(_batch_not_divisible, 2, model_dir, str(tmp_path / "run"))


# ------------------------------------------------------------------ sharded training

SHARDED = ["saes.shards=2", "loss.auxk_coeff=0"]


def _sharded_fit(rank, world, model_dir, run_dir, overrides, kill):
    from fastsae.train import Trainer

    batches = global_batches()
    data = KillAt(batches, rank=1, at=5) if kill else batches
    trainer = Trainer(dp_config(model_dir, run_dir, *SHARDED, *overrides), model=str(model_dir), dataset=data)
    assert trainer.saes[HOOK].W_enc.shape == (32, 32)  # this rank's half of the 64 latents
    trainer.fit()


@pytest.mark.parametrize("overrides", [[], ["saes.activation=topk", "saes.k=4", "saes.decoder_norm=project"]],
                         ids=["relu", "topk"])
def test_a_two_shard_run_equals_the_unsharded_run(tmp_path, model_dir, overrides):
    """Trainer with saes.shards=2 on 2 processes: the same losses and, in its checkpoint (the SAE
    gathered whole), the same weights as a one-process run."""
    from fastsae.train import Trainer
    from fastsae.train import checkpoint as ckpt
    from fastsae.train.metrics import read_metrics

    run_ranks(_sharded_fit, 2, model_dir, str(tmp_path / "sharded"), overrides, False)
    single = Trainer(dp_config(model_dir, tmp_path / "single", "loss.auxk_coeff=0", *overrides),
                     model=str(model_dir), dataset=global_batches())
    single.fit()
    for key in ("loss", "l0", f"dead/{HOOK}", "grad_norm"):
        got = [m[key] for m in read_metrics(tmp_path / "sharded") if key in m]
        want = [m[key] for m in read_metrics(tmp_path / "single") if key in m]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6) and len(got) == N_STEPS, key
    sharded = fastsae.load_run(tmp_path / "sharded")[HOOK]
    for name, param in single.saes[HOOK].named_parameters():
        torch.testing.assert_close(getattr(sharded, name), param.detach(), rtol=1e-4, atol=1e-6)


def test_a_killed_two_shard_run_resumes_on_one_process(tmp_path, model_dir):
    """The checkpoint of a sharded run holds the whole SAE and whole Adam state: it resumes on
    another shard count (here one process) and ends where an uninterrupted run ends."""
    from fastsae.train import Trainer
    from fastsae.train import checkpoint as ckpt

    with pytest.raises(Exception):
        run_ranks(_sharded_fit, 2, model_dir, str(tmp_path / "killed"), [], True)
    resumed = Trainer.from_run_dir(tmp_path / "killed", model=str(model_dir), dataset=global_batches(),
                                   overrides=["saes.shards=1"])
    assert resumed.step_count == 4
    resumed.fit()
    _, weights = _single_steps(model_dir, tmp_path / "single", ["loss.auxk_coeff=0"])
    for name, param in fastsae.load_run(tmp_path / "killed")[HOOK].named_parameters():
        torch.testing.assert_close(param, weights[name], rtol=1e-4, atol=1e-6)


def _shard_errors(rank, world, model_dir, run_dir):
    from fastsae.train import Trainer
    from fastsae.train.config import ConfigError

    with pytest.raises(ConfigError, match="saes.shards: n_latents=63 must be divisible by saes.shards=2"):
        Trainer(dp_config(model_dir, run_dir, *SHARDED, "saes.n_latents=63"), model=str(model_dir))
    with pytest.raises(ConfigError, match="loss.auxk_coeff: AuxK is not implemented for sharded SAEs"):
        Trainer(dp_config(model_dir, run_dir, "saes.shards=2", "saes.activation=topk", "saes.k=4"),
                model=str(model_dir))


def test_sharded_config_errors(tmp_path, model_dir):
    run_ranks(_shard_errors, 2, model_dir, str(tmp_path / "run"))


def test_data_parallel_and_sharding_compose(tmp_path, model_dir):
    """4 processes as 2 data groups x 2 shards: the same SAE as one process after the run."""
    from fastsae.train import checkpoint as ckpt

    run_ranks(_sharded_fit, 4, model_dir, str(tmp_path / "composed"), ["saes.activation=topk", "saes.k=4"], False)
    _, weights = _single_steps(model_dir, tmp_path / "single", ["loss.auxk_coeff=0", "saes.activation=topk",
                                                                "saes.k=4"])
    for name, param in fastsae.load_run(tmp_path / "composed")[HOOK].named_parameters():
        torch.testing.assert_close(param, weights[name], rtol=1e-4, atol=1e-6)
