"""One e2e SAE training step: fastsae's Trainer.step vs the same step done as the paper's code does.

    fastsae  clean run without grad and without logits (caching the first SAE block's input), the
             spliced run from that cached residual (blocks before the SAE not rerun), the KL from
             the two final hidden states by fused_linear_kl (no N x V logits), backward, Adam.
    paper    (e2e_sae) the full clean run with logits, the full hooked run with logits,
             log_softmax of both, kl_div(..., log_target=True, reduction="batchmean") + sparsity,
             backward through every [N, V] tensor, Adam.

Model: a random-weight GPT-2 (4 layers, d_model 256, vocab 50,257) saved and loaded through
LanguageModel like a real one; batch 8 x 128 tokens; one ReLU SAE of 4,096 latents at
blocks.2.hook_resid_pre ("full"). "small" (the CPU default, for CI): 2 layers, d_model 64,
vocab 50,257 (the logits are the point), 2 x 32 tokens, 512 latents. FASTSAE_BENCH_SIZE overrides.

Reported: median time of a step (pytest-benchmark), peak extra memory of one step (CUDA:
max_memory_allocated; CPU: peak RSS growth in a fresh process, above the RSS after building the
model, SAE and optimizer and one step: benchmarks/conftest.py). The issue's target, as ratios
fastsae / paper: memory <= 0.25, time <= 1. benchmarks/conftest.py writes both records to
benchmarks/results/bench_e2e_step_<size>_<device>.json.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, bench_size, peak_extra_bytes, time_step

SHAPES = {  # n_layer, d_model, d_vocab, batch, ctx, n_latents
    "full": dict(n_layer=4, d_model=256, d_vocab=50_257, batch=8, ctx=128, n_latents=4096),
    "small": dict(n_layer=2, d_model=64, d_vocab=50_257, batch=2, ctx=32, n_latents=512),
}
SPARSITY_COEFF = 1.5


def model_dir(shape: dict) -> Path:
    """A random-weight GPT-2 of this shape, saved once per shape in the temp dir."""
    root = Path(tempfile.gettempdir()) / "fastsae-bench-e2e" / "{n_layer}-{d_model}-{d_vocab}".format(**shape)
    if (root / "config.json").is_file():
        return root
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastsae.model.embedded import train_tokenizer

    tokenizer = train_tokenizer("a small tokenizer for a benchmark model\n\nwith random weights " * 20, 300)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=shape["d_vocab"], n_positions=max(128, shape["ctx"]), n_ctx=max(128, shape["ctx"]),
                        n_embd=shape["d_model"], n_layer=shape["n_layer"], n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    tmp = Path(tempfile.mkdtemp(dir=root.parent if root.parent.exists() else None))
    GPT2LMHeadModel(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, root)
    except OSError:  # another process made it first
        pass
    return root


def build(variant: str, shape: dict, device: str = DEVICE):
    """(step function, state) for one variant; building it is not part of the measurement."""
    from fastsae.model.lm import LanguageModel
    from fastsae.train import Trainer, load_config

    hook = f"blocks.{shape['n_layer'] // 2}.hook_resid_pre"
    lm = LanguageModel.load(str(model_dir(shape)), device=device)
    config = load_config({}, [f"model.name={model_dir(shape)}", f"saes.hooks=[{hook}]", f"device={device}",
                              f"saes.n_latents={shape['n_latents']}", f"optim.batch_size={shape['batch']}",
                              f"data.context_length={shape['ctx']}", "log.progress=false",
                              f"loss.sparsity_coeff={SPARSITY_COEFF}", "loss.kl_coeff=1.0"])
    trainer = Trainer(config, model=lm, dataset=[])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape["d_vocab"], (shape["batch"], shape["ctx"]), generator=g).to(device)
    if variant == "fastsae":
        return lambda: trainer.step(tokens)

    sae, optimizer = trainer.saes[hook], trainer.optimizer

    def paper_step():
        # e2e_sae's train step: both runs to logits, log_softmax over the vocabulary, kl_div.
        with torch.no_grad():
            orig_logits = lm.model(tokens)
        codes = []

        def splice(acts, hook):
            out = sae(acts, return_code=True)
            codes.append(out.code)
            return out.reconstruction

        new_logits = lm.model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
        kl = F.kl_div(F.log_softmax(new_logits.flatten(0, 1), dim=-1),
                      F.log_softmax(orig_logits.flatten(0, 1), dim=-1), log_target=True, reduction="batchmean")
        sparsity = torch.norm(codes[0], p=1, dim=-1).mean() / sae.d_in
        loss = kl + SPARSITY_COEFF * sparsity
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.params, 10.0)
        optimizer.step()
        return float(loss.detach())

    return paper_step


def warm_step(variant: str, shape: dict, device: str = DEVICE):
    """build()'s step, called once: lazy initialisations and Adam's state are part of the baseline
    (equal for both variants), not of a step's peak memory."""
    step = build(variant, shape, device)
    step()
    return step


def peak_memory_bytes(variant: str, shape: dict, step) -> int:
    # CPU: a fixed mmap threshold, so every large tensor is its own mapping, returned to the OS when
    # freed: the first step's freed memory cannot hide the second step's peak inside glibc's heap.
    env = dict(HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), MALLOC_MMAP_THRESHOLD_="131072")
    return peak_extra_bytes(step, warm_step, variant, shape, timeout=900, env=env)


@pytest.mark.parametrize("variant", ["fastsae", "paper"])
def test_e2e_step(benchmark, variant):
    shape = SHAPES[bench_size()]
    step = warm_step(variant, shape)  # warm up (and Adam's state) before timing
    time_step(benchmark, step,
              "e2e-step-{n_layer}L-d{d_model}-V{d_vocab}-{batch}x{ctx}-n{n_latents}".format(**shape),
              dict(variant=variant, **shape),
              pedantic=dict(rounds=5 if bench_size() == "full" else 2, warmup_rounds=1))
    peak = peak_memory_bytes(variant, shape, step)
    benchmark.extra_info["peak_extra_memory_bytes"] = peak
