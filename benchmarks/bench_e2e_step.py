"""One SAE training step: fastsae's Trainer.step (e2e and local) vs the e2e step as the paper's code does it.

    fastsae e2e    clean run without grad and without logits (caching the first SAE block's input), the
                   spliced run from that cached residual (blocks before the SAE not rerun), the KL from
                   the two final hidden states by fused_linear_kl (no N x V logits), backward, Adam.
    paper e2e      (e2e_sae) the full clean run with logits, the full hooked run with logits,
                   log_softmax of both, kl_div(..., log_target=True, reduction="batchmean") + sparsity,
                   backward through every [N, V] tensor, Adam.
    fastsae local  the local (MSE) baseline: the clean run up to the SAE's hook, the SAE, MSE, Adam.
                   The paper's e2e cost 2 to 3.5 times its local step; the ratio column shows ours.

Model: a random-weight GPT-2 saved and loaded through LanguageModel like a real one, one ReLU SAE
at blocks.{n_layer // 2}.hook_resid_pre. Shapes: on a GPU ("full") GPT-2 small as the presets train
it (12 layers, d 768, V 50,257, 16 x 1,024 tokens, 46,080 latents at layer 6); on CPU "full" the
README's CPU figures (4 layers, d 256, 8 x 128 tokens, 4,096 latents), "small" 2 layers, d 64,
2 x 32 tokens, 512 latents (V 50,257 throughout: the logits are the point). Cost model:
harness.train_step_cost. Peak memory: one step's peak above the model, SAE, optimizer state and
batch (after a warm-up step).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, HAS_CUDA, bench_size, measure, train_step_cost

SHAPES = {
    "full": dict(n_layer=12, d_model=768, n_head=12, d_vocab=50_257, batch=16, ctx=1024, n_latents=46_080)
    if HAS_CUDA else dict(n_layer=4, d_model=256, n_head=4, d_vocab=50_257, batch=8, ctx=128, n_latents=4096),
    "small": dict(n_layer=2, d_model=64, n_head=4, d_vocab=50_257, batch=2, ctx=32, n_latents=512),
}
VARIANTS = ("fastsae e2e", "paper e2e", "fastsae local")
# The presets' coefficients: e2e sparsity 1.5 / KL 1.0; local sparsity 6.0 / MSE 1.0.
LOSS = {"e2e": ["loss.sparsity_coeff=1.5", "loss.kl_coeff=1.0"],
        "local": ["loss.sparsity_coeff=6.0", "loss.kl_coeff=0.0", "loss.local_mse_coeff=1.0"]}
SPARSITY_COEFF = 1.5


def model_dir(shape: dict) -> Path:
    """A random-weight GPT-2 of this shape, saved once per shape in the temp dir."""
    name = "{n_layer}-{d_model}-{n_head}-{d_vocab}".format(**shape)
    root = Path(tempfile.gettempdir()) / "fastsae-bench-e2e" / name
    if (root / "config.json").is_file():
        return root
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastsae.model.embedded import train_tokenizer

    tokenizer = train_tokenizer("a small tokenizer for a benchmark model\n\nwith random weights " * 20, 300)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=shape["d_vocab"], n_positions=max(128, shape["ctx"]), n_ctx=max(128, shape["ctx"]),
                        n_embd=shape["d_model"], n_layer=shape["n_layer"], n_head=shape["n_head"],
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


@functools.lru_cache(maxsize=1)
def load_model(path: Path, device: str):
    """The frozen model, loaded once for all variants (it is never changed by a step)."""
    from fastsae.model.lm import LanguageModel

    return LanguageModel.load(str(path), device=device)


def build(variant: str, shape: dict, device: str = DEVICE):
    """The step function of one variant; building it is not part of the measurement."""
    from fastsae.train import Trainer, load_config

    hook = f"blocks.{shape['n_layer'] // 2}.hook_resid_pre"
    lm = load_model(model_dir(shape), device)
    kind = variant.split()[-1]
    config = load_config({}, [f"model.name={model_dir(shape)}", f"saes.hooks=[{hook}]", f"device={device}",
                              f"saes.n_latents={shape['n_latents']}", f"optim.batch_size={shape['batch']}",
                              f"data.context_length={shape['ctx']}", "log.progress=false", *LOSS[kind]])
    trainer = Trainer(config, model=lm, dataset=[])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape["d_vocab"], (shape["batch"], shape["ctx"]), generator=g).to(device)
    if variant.startswith("fastsae"):
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
    (equal for all variants), not of a step's peak memory."""
    step = build(variant, shape, device)
    step()
    return step


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, variant):
    shape = SHAPES[bench_size()]
    step = warm_step(variant, shape)
    flops = train_step_cost(variant.split()[-1], shape["n_layer"], shape["d_model"], shape["d_vocab"], shape["ctx"],
                            shape["n_layer"] // 2, shape["n_latents"], shape["batch"])
    label = "{n_layer}L d={d_model} V={d_vocab} {batch}x{ctx} tokens n={n_latents}".format(**shape)
    measure(benchmark, step, op="train_step", shape=label, variant=variant, passes="step", dtype="float32",
            flops=flops, bytes_=None, triton=False,
            pedantic=dict(rounds=5, warmup_rounds=0, iterations=1), **shape)  # seconds per step on CPU
