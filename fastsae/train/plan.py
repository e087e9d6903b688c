"""`fastsae plan`: the memory one GPU needs for a run, and the largest dictionary that fits.

    plan = memory_plan(load_config("gpt2-e2e"), gpus=8, gpu_memory=80 * GiB)
    print(format_plan(plan))

Per GPU, for the config's batch and sharding (world = gpus = data groups x saes.shards):
- LM weights: the frozen model, every rank holds all of it (plus an fp32 W_U copy for the KL
  when the LM is not fp32).
- SAE weights / gradients / Adam state: per SAE, this rank's 1/shards of W_enc [d_in, n], b_enc and
  W_dec [n, d_out], and the replicated b_dec [d_out] and (a skip-transcoder's) W_skip [d_in, d_out];
  Adam keeps two moments in the parameters' dtype. A transcoder "IN->OUT" reads IN's width and
  writes OUT's (coder_widths: d_mlp for an MLP's hook_pre / hook_post, else d_model).
- activations: what one micro-batch (batch_size / data groups / grad_accum sequences) keeps for
  backward: the spliced run's saved tensors in the blocks after the first SAE, the clean run's
  cached residuals, and the SAEs' inputs and codes. The SAE kind says what its training pass holds
  (fastsae.activations: Activation.memory): a selection kind (TopK, BatchTopK, Matryoshka) keeps each
  token's candidates, gathered over shards, and the selected code (Matryoshka also its inner
  reconstructions); an elementwise one (ReLU, JumpReLU) keeps its code as
  fastsae.ops.relu_autoencode does, compact: about tokens x n_local / 256 entries, with its
  backward's per-entry buffers; a kind on the chunked dense reference keeps per-token sums. A kind
  that asks an e2e run for further spliced runs (Matryoshka with prefix_loss="kl": one per inner
  prefix) adds their blocks' activations, one more set per run.
- workspaces: the chunked buffers of the kind's pass (the selection encoder's [chunk, n_local]
  pre-activation block; relu_autoencode's dense-row workspaces, a fixed budget: 4 x CHUNK_ELEMENTS;
  the dense reference's recomputed chunk) and of the fused KL (two [chunk, d_vocab] fp32 logits
  blocks), CHUNK_ELEMENTS elements each. No term is [tokens, n_local]: an elementwise SAE's memory
  does not depend on its code's density.
- optimizer temporaries: Adam's foreach step allocates one parameter-sized temporary after the
  activations are freed; the plan counts only what it adds beyond them.
- reserve: the CUDA context and cuBLAS workspace (1 GiB) plus 5 % of the GPU for allocator
  fragmentation, taken off the GPU's memory before "fits" is decided.

The LM's activation terms count the tensors TransformerLens keeps per block (residuals, q/k/v,
attention scores and pattern, MLP pre/post activations); they are estimates of eager PyTorch, not
of a fused attention. The SAE terms are exact counts of the tensors the ops allocate; a test
checks the whole estimate against a measured CPU peak.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from fastsae._dtypes import DTYPES
from fastsae.activations import get_activation
from fastsae.spec import check_params, hook_in_out
from fastsae.train.config import ConfigError, TrainConfig

GiB = 1 << 30
_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
# The CUDA context, cuBLAS workspace and NCCL buffers, and the allocator's fragmentation.
CONTEXT_RESERVE = 1 * GiB
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class LMShape:
    """What the plan needs of a language model. n_params: all its weights."""

    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    n_params: int

    @classmethod
    def gpt2_like(cls, d_model, n_layers, n_heads, d_vocab, n_ctx, d_mlp=None) -> "LMShape":
        """A GPT-2-style decoder: embeddings, attention + MLP blocks with biases, tied unembedding."""
        d_mlp = d_mlp or 4 * d_model
        block = 4 * d_model * d_model + 4 * d_model + 2 * d_model * d_mlp + d_mlp + d_model + 4 * d_model
        n_params = d_vocab * d_model + n_ctx * d_model + n_layers * block + 2 * d_model
        return cls(d_model, n_layers, n_heads, d_mlp, d_vocab, n_ctx, n_params)


# Models whose configuration the hub would give, for planning offline.
KNOWN_MODELS = {
    "gpt2": LMShape.gpt2_like(768, 12, 12, 50257, 1024),
    "gpt2-medium": LMShape.gpt2_like(1024, 24, 16, 50257, 1024),
    "gpt2-large": LMShape.gpt2_like(1280, 36, 20, 50257, 1024),
    "gpt2-xl": LMShape.gpt2_like(1600, 48, 25, 50257, 1024),
    "roneneldan/TinyStories-1M": LMShape.gpt2_like(64, 8, 16, 50257, 2048),
}


def lm_shape(name: str) -> LMShape:
    """The shape of config.model.name: a known name, "embedded", or a directory with an HF config.json."""
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    if name == "embedded":
        from fastsae.model.embedded import DEFAULT_CONFIG as e

        return LMShape.gpt2_like(e.n_embd, e.n_layer, e.n_head, e.vocab_size, e.n_ctx)
    config_path = Path(name) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"model.name: cannot plan for {name!r} offline: it is not one of {sorted(KNOWN_MODELS)}, "
                          "'embedded', or a directory holding an HF config.json")
    hf = json.loads(config_path.read_text())

    def first(*keys, default=None):
        value = next((hf[key] for key in keys if hf.get(key) is not None), default)
        if value is None:
            raise ConfigError(f"model.name: {config_path} has none of {list(keys)}")
        return value

    d_model = first("n_embd", "hidden_size", "d_model")
    return LMShape.gpt2_like(d_model, first("n_layer", "num_hidden_layers", "num_layers"),
                             first("n_head", "num_attention_heads", "num_heads"), first("vocab_size"),
                             first("n_positions", "max_position_embeddings", "n_ctx"),
                             first("n_inner", "intermediate_size", default=4 * d_model))


def parse_memory(text: str | int | float) -> int:
    """'80GB', '80 GiB', '141G', '512MiB' or a number of bytes -> bytes (GB and GiB both 2^30,
    as GPU memory is quoted)."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.]+)\s*(([KMGT])i?B?)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-memory must look like 80GB, 141GiB or 512MiB, got {text!r}")
    unit = (match.group(3) or "").upper()
    return int(float(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


@dataclass
class MemoryPlan:
    """Bytes per GPU by item, and what they add up to."""

    items: dict[str, int]
    gpus: int
    shards: int
    n_latents: int
    micro_batch: int
    gpu_memory: int
    largest_n_latents: int  # same config, this sharding: the largest dictionary that fits
    largest_n_latents_all_shards: int  # the same with every GPU a shard (saes.shards = gpus)
    extra_spliced_runs: int = 0  # further runs of the blocks after the SAE per step that the kind asks for (e2e)

    @property
    def total(self) -> int:
        return sum(self.items.values())

    @property
    def usable(self) -> int:
        return usable_memory(self.gpu_memory)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def usable_memory(gpu_memory: int) -> int:
    return int((gpu_memory - CONTEXT_RESERVE) * (1 - FRAGMENTATION))


def _items(cfg: TrainConfig, lm: LMShape, n_latents: int, gpus: int, shards: int) -> tuple[dict[str, int], int]:
    from fastsae.ops.checks import CHUNK_ELEMENTS

    widths = coder_widths(cfg, lm)  # [(d_in, d_out)] per SAE
    data_groups = gpus // shards
    micro = cfg.optim.batch_size // data_groups // cfg.optim.grad_accum
    ctx, d = cfg.data.context_length, lm.d_model
    tokens = micro * ctx
    lm_bytes, sae_bytes = _BYTES[cfg.model.dtype], _BYTES[cfg.saes.dtype]
    act_bytes = 2 if cfg.amp == "bf16" else lm_bytes
    n_local = n_latents // shards

    items = {"LM weights": lm.n_params * lm_bytes}
    if lm_bytes != 4 and cfg.is_e2e:
        items["LM weights"] += d * lm.d_vocab * 4  # the trainer's fp32 W_U for the KL
    # W_enc, W_dec, b_enc, b_dec and the activation's trained per-latent tensors (JumpReLU's threshold)
    per_latent = sum(extra.per_latent and extra.trainable for extra in get_activation(cfg.saes.activation).extra_tensors.values())
    sae_params = sum(d_in * n_local + n_local * d_out + (1 + per_latent) * n_local + d_out
                     + (d_in * d_out if cfg.saes.skip else 0) for d_in, d_out in widths)
    items["SAE weights"] = sae_params * sae_bytes
    items["SAE gradients"] = sae_params * sae_bytes
    items["Adam state"] = 2 * sae_params * sae_bytes

    # The LM: per block and token, the tensors eager TransformerLens keeps for backward (~12
    # d-wide: residuals, layer norms, q, k, v, z, attention and MLP outputs; 4 d_mlp-wide: MLP
    # pre, post and the GELU's inputs; 3 per head and key: scores, masked scores, pattern).
    per_block = 12 * d + 4 * lm.d_mlp + 3 * lm.n_heads * ctx
    hook_blocks = sorted(_block(hook) for hook in cfg.saes.hooks)
    if cfg.is_e2e:
        grad_blocks = lm.n_layers - max(hook_blocks[0], 0)
        cached = 2 + len(cfg.loss.downstream_hooks) * 2  # start residual, h_orig, downstream clean + spliced
        cached_width = cached * d
    else:
        grad_blocks = 0  # local training: no gradient through the LM
        # the clean run's activations each SAE reads: its input (a transcoder's IN) and a transcoder's target at OUT
        transcoder = [len(set(hook_in_out(hook))) == 2 for hook in cfg.saes.hooks]
        cached_width = sum(d_in + d_out * t for (d_in, d_out), t in zip(widths, transcoder))
    items["LM activations"] = tokens * act_bytes * (grad_blocks * per_block + cached_width + per_block)

    # The SAEs: the input and the reconstruction partials, plus what the kind's training pass holds
    # (its code, candidates and workspaces; fastsae.activations: Activation.memory).
    # (an SAE: 4 d-wide tensors; a transcoder: 2 of each width, its input and target's among them)
    sae_acts, workspace, need = 0, 0, None
    for d_in, d_out in widths:
        need = _activation(cfg).memory(tokens, n_local, d_in, sae_bytes, shards, d_out=d_out)
        sae_acts += tokens * sae_bytes * 2 * (d_in + d_out) + need.code
        workspace += need.workspace
    items["SAE activations"] = sae_acts
    if cfg.is_e2e:
        workspace += min(CHUNK_ELEMENTS, tokens * 2 * lm.d_vocab) * 4  # the fused KL's two logits blocks
        # further spliced runs a kind asks for (Matryoshka's prefix KL), each keeping its blocks' activations
        items["LM activations"] += need.extra_spliced_runs * tokens * act_bytes * grad_blocks * per_block
    items["kernel workspaces"] = workspace
    # Adam's foreach step builds one parameter-sized temporary (the denominator) after backward
    # has freed the activations: only its excess over them raises the peak.
    step_transients = items["LM activations"] + items["SAE activations"] + workspace
    items["optimizer temporaries"] = max(0, sae_params * sae_bytes - step_transients)
    return items, micro


def hook_width(lm: LMShape, hook: str) -> int:
    """The width of the activation at a TransformerLens hook, from the model's shape: d_mlp for an
    MLP's hidden layer (blocks.L.mlp.hook_pre / hook_post / hook_pre_linear), else d_model."""
    return lm.d_mlp if re.search(r"\.mlp\.hook_(pre|post|pre_linear)$", hook) else lm.d_model


def coder_widths(cfg: TrainConfig, lm: LMShape) -> list[tuple[int, int]]:
    """(d_in, d_out) of each SAE of the config: an SAE reads and writes d_model; a transcoder
    "IN->OUT" the widths of its two hooks (hook_width)."""
    out = []
    for hook in cfg.saes.hooks:
        hook_in, hook_out = hook_in_out(hook)
        out.append((lm.d_model, lm.d_model) if hook_in == hook_out else (hook_width(lm, hook_in), hook_width(lm, hook_out)))
    return out


def _activation(cfg: TrainConfig):
    """The config's activation with its hyperparameters (checked without a dictionary size: the
    planner tries many)."""
    kind = get_activation(cfg.saes.activation)
    return kind(check_params(kind, cfg.saes.k, cfg.saes.params, None))


def _block(hook: str) -> int:
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else -1


def memory_plan(cfg: TrainConfig, *, gpus: int = 1, gpu_memory: int | str = 80 * GiB,
                lm: LMShape | None = None) -> MemoryPlan:
    """The per-GPU memory of cfg run on `gpus` GPUs (world = data groups x cfg.saes.shards)."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"--gpus must be a positive int, got {gpus!r}")
    gpu_memory = parse_memory(gpu_memory)
    shards = cfg.saes.shards
    if gpus % shards:
        raise ConfigError(f"saes.shards={shards} must divide --gpus {gpus} (the GPUs are data groups x shards)")
    data_groups = gpus // shards
    if cfg.optim.batch_size % (data_groups * cfg.optim.grad_accum):
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} must be divisible by the data groups "
                          f"({data_groups}) x optim.grad_accum ({cfg.optim.grad_accum})")
    lm = lm or lm_shape(cfg.model.name)
    n_latents = cfg.saes.n_latents or int(round(cfg.saes.ratio * lm.d_model))
    items, micro = _items(cfg, lm, n_latents, gpus, shards)
    runs = _activation(cfg).memory(1, 1, lm.d_model, 4, 1).extra_spliced_runs if cfg.is_e2e else 0
    return MemoryPlan(items, gpus, shards, n_latents, micro, gpu_memory,
                      _largest(cfg, lm, gpus, shards, usable_memory(gpu_memory)),
                      _largest(cfg, lm, gpus, gpus, usable_memory(gpu_memory)), runs)


def _largest(cfg, lm, gpus, shards, budget) -> int:
    """The largest n_latents (a multiple of shards) whose plan fits the budget; 0 if none does.

    Every item grows linearly in n_latents but for the capped workspace, so a doubling search
    followed by bisection finds it."""
    if cfg.optim.batch_size % (gpus // shards * cfg.optim.grad_accum):
        return 0
    fits = lambda n: sum(_items(cfg, lm, n * shards, gpus, shards)[0].values()) <= budget
    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * shards


def format_plan(plan: MemoryPlan, cfg: TrainConfig) -> str:
    gib = lambda b: f"{b / GiB:,.2f} GiB"
    lines = [f"{cfg.name}: {cfg.model.name}, {len(cfg.saes.hooks)} SAE(s) of {plan.n_latents:,} latents "
             f"({cfg.saes.activation}{f', k={cfg.saes.k}' if cfg.saes.k else ''}), {plan.gpus} GPU(s) = "
             f"{plan.gpus // plan.shards} data x {plan.shards} shard(s), micro-batch {plan.micro_batch} x "
             f"{cfg.data.context_length} tokens per GPU",
             "", "memory per GPU:"]
    width = max(map(len, plan.items))
    lines += [f"  {name:<{width}}  {gib(value):>14}" for name, value in plan.items.items()]
    lines.append(f"  {'total':<{width}}  {gib(plan.total):>14}")
    if plan.extra_spliced_runs:
        runs = plan.extra_spliced_runs
        lines += ["", *textwrap.wrap(
            f"{cfg.saes.activation} asks for {runs} more spliced run(s) per step, one KL per further reconstruction "
            "it trains (Matryoshka's inner prefixes with prefix_loss: kl): each keeps the blocks after the first SAE "
            "for backward (in LM activations above) and repeats the spliced run's forward and backward and its "
            f"fused KL, so the LM compute after the SAE is {1 + runs} times a plain e2e step's.", 100)]
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"\n{verdict} in {gib(plan.gpu_memory)} ({gib(plan.usable)} usable after the CUDA context "
                 f"and {FRAGMENTATION:.0%} fragmentation reserve)")
    lines.append(f"largest dictionary that fits, saes.shards={plan.shards}: {_latents(plan.largest_n_latents)}")
    if plan.shards != plan.gpus:
        lines.append(f"largest dictionary that fits, saes.shards={plan.gpus}: "
                     f"{_latents(plan.largest_n_latents_all_shards)}")
    return "\n".join(lines)


def _latents(n: int) -> str:
    if n == 0:
        return "none (even one latent per shard does not fit: lower the batch or raise grad_accum)"
    return f"{n:,} latents (2^{math.log2(n):.2f})"
