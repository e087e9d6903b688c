"""SAEBench's core metrics (fastsae.train.saebench_core) and the SAEBench view of an SAE (fastsae.saebench).

Every leg: `Evaluator.evaluate(saebench=True)` on a tiny random GPT-2 against a dense
recomputation here (full logits of the clean, spliced and zero-ablated runs, the dense code),
written from sae-bench 0.6.0's formulas, on the same batches, special tokens included.
Where sae-bench installs (CI's second leg: `pip install --no-deps sae-bench==0.6.0 tabulate`):
the JSON validates against its CoreEvalOutput and round-trips through it unchanged, and its own
functions (get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics,
get_featurewise_weight_based_metrics, calculate_misc_metrics) on a HookedTransformer give the same
numbers; the SAEs meet its custom-SAE checks.
"""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from fastsae import E2ESAE
from fastsae.activations import SparseCode
from fastsae.cli import main
from fastsae.saebench import SAEBenchSAE, saebench_sae
from fastsae.spec import hook_in_out
from fastsae.train.config import load_config
from fastsae.train.evaluator import Evaluator
from helpers_models import random_batches, save_tiny_gpt2

HOOK = "blocks.1.hook_resid_pre"
D, N, CTX, BATCH, N_BATCHES = 32, 96, 16, 4, 3
SPECIAL = 0  # the tiny tokenizer's <|endoftext|>: its eos and bos


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("saebench") / "model", n_layer=2, n_embd=D, n_ctx=64)


def tiny_config(model_dir, hook=HOOK):
    return load_config("embedded", [f"model.name={model_dir}", f"saes.hooks={json.dumps([hook])}",
                                    f"data.context_length={CTX}", f"eval.batch_size={BATCH}", "device=cpu"])


def eval_batches():
    batches = random_batches(N_BATCHES, BATCH, CTX, seed=3)
    batches[0][0, 3] = SPECIAL  # special tokens mid-sequence and at a sequence's start
    batches[1][2, 0] = SPECIAL
    batches[2][1, 5:8] = SPECIAL
    return batches


def make_sae(activation: str, decoder_norm: str = "forward", seed: int = 0) -> E2ESAE:
    torch.manual_seed(seed)
    sae = E2ESAE(D, N, activation, k=6 if activation in ("topk", "batchtopk") else None, decoder_norm=decoder_norm,
                 metadata={"hook": HOOK})
    with torch.no_grad():
        sae.b_enc.normal_(-0.2, 0.1)  # some latents off, some on
        sae.b_dec.normal_(0, 0.1)
        if decoder_norm == "forward":  # stored rows of unequal norms, as after training
            sae.W_dec.mul_(torch.rand(N, 1) + 0.5)
    return sae


def run_saebench(model_dir, sae, hook=HOOK):
    evaluator = Evaluator.build(tiny_config(model_dir, hook), {hook: sae}, eval_dataset=eval_batches())
    return evaluator.evaluate(N_BATCHES * BATCH * CTX, saebench=True)["saebench"], evaluator.lm


def kl_per_token(clean, other):
    """SAEBench's kl(): softmax, log, sum p (log p - log q) (in float64 here)."""
    p, q = F.softmax(clean, dim=-1), F.softmax(other, dim=-1)
    return (p * (p.log() - q.log())).sum(-1)


def ce_per_token(logits, tokens):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(
        tokens.shape[0], -1)


def dense_reference(lm, sae, hook=HOOK):
    """Every core metric from full logits and dense codes, sae-bench 0.6.0's formulas, per batch. A
    transcoder "IN->OUT": its code of the activation at IN, OUT replaced by its output (ablated: OUT
    zeroed), its output compared with the activation at OUT."""
    hook_in, hook_out = hook_in_out(hook)
    seen = {}
    splice = ({hook: lambda a: sae(a)} if hook_in == hook_out else
              {hook_in: lambda a: seen.setdefault("x", a), hook_out: lambda a: sae(seen.pop("x"))})
    acc = {k: [] for k in ("kl_sae", "kl_abl", "ce_clean", "ce_sae", "ce_abl", "l2_in", "l2_out", "l2_ratio", "l0",
                           "l1", "ev_legacy", "mse", "cossim")}
    per_batch = {k: [] for k in ("rrb", "A", "B", "R")}
    fired = torch.zeros(N, dtype=torch.float64)
    fired_sequences = torch.zeros(N, dtype=torch.float64)
    counted = 0
    with torch.no_grad():
        for tokens in eval_batches():
            mask = tokens != SPECIAL
            clean = lm.logits(tokens).double()
            spliced = lm.logits(tokens, splice).double()
            ablated = lm.logits(tokens, {hook_out: torch.zeros_like}).double()
            acc["kl_sae"].append(kl_per_token(clean, spliced)[mask])
            acc["kl_abl"].append(kl_per_token(clean, ablated)[mask])
            for name, logits in (("ce_clean", clean), ("ce_sae", spliced), ("ce_abl", ablated)):
                acc[name].append(ce_per_token(logits, tokens)[mask[:, :-1]])
            acts = lm.activations(tokens, list(dict.fromkeys((hook_in, hook_out))))
            code = sae.encode(acts[hook_in])
            code = (code.to_dense(N) if isinstance(code, SparseCode) else code).double()
            x_hat = sae(acts[hook_in]).double()
            x = acts[hook_out].double()  # the target: the SAE's input, a transcoder's OUT
            xm, rm, cm = x[mask], x_hat[mask], code[mask]
            resid = (xm - rm).pow(2).sum(-1)
            acc["l2_in"].append(xm.norm(dim=-1))
            acc["l2_out"].append(rm.norm(dim=-1))
            acc["l2_ratio"].append(rm.norm(dim=-1) / xm.norm(dim=-1))
            acc["l0"].append((cm != 0).sum(-1).double())
            acc["l1"].append(cm.sum(-1))
            acc["ev_legacy"].append(1 - resid / (xm - xm.mean(0)).pow(2).sum(-1))
            acc["mse"].append(resid / mask.sum())
            acc["cossim"].append(F.cosine_similarity(xm, rm, dim=-1))
            per_batch["rrb"].append(rm.pow(2).sum(-1).mean() / (xm * rm).sum(-1).mean())
            per_batch["A"].append(xm.pow(2).sum(-1).mean())
            per_batch["B"].append(xm.pow(2).mean(0))  # [d], concatenated and averaged as 0.6.0 does
            per_batch["R"].append(resid.mean())
            on = (code * mask[..., None]) > 0
            fired += on.sum((0, 1))
            fired_sequences += on.any(1).sum(0)
            counted += int(mask.sum())
    mean = {k: torch.cat(v).mean().item() for k, v in acc.items()}
    total_variance = torch.stack(per_batch["A"]).mean() - torch.cat(per_batch["B"]).mean() ** 2
    density = fired / counted
    W_enc, W_dec = sae.W_enc.detach().double(), sae.W_dec.detach().double()

    def max_cos(columns):  # the whole n x n matrix, the diagonal excluded
        unit = F.normalize(columns, dim=0)
        sims = unit.T @ unit
        return sims.fill_diagonal_(-math.inf).max(1).values

    return {
        "kl_div_with_sae": mean["kl_sae"], "kl_div_with_ablation": mean["kl_abl"],
        "kl_div_score": (mean["kl_abl"] - mean["kl_sae"]) / mean["kl_abl"],
        "ce_loss_without_sae": mean["ce_clean"], "ce_loss_with_sae": mean["ce_sae"],
        "ce_loss_with_ablation": mean["ce_abl"],
        "ce_loss_score": (mean["ce_abl"] - mean["ce_sae"]) / (mean["ce_abl"] - mean["ce_clean"]),
        "explained_variance": (1 - torch.stack(per_batch["R"]).mean() / total_variance).item(),
        "explained_variance_legacy": mean["ev_legacy"], "mse": mean["mse"], "cossim": mean["cossim"],
        "l2_norm_in": mean["l2_in"], "l2_norm_out": mean["l2_out"], "l2_ratio": mean["l2_ratio"],
        "relative_reconstruction_bias": torch.stack(per_batch["rrb"]).mean().item(),
        "l0": mean["l0"], "l1": mean["l1"],
        "feature_density": density, "consistent_activation_heuristic": fired / fired_sequences,
        "frac_alive": (density > 0).double().mean().item(),
        "freq_over_1_percent": (density > 0.01).double().mean().item(),
        "normalized_freq_over_10_percent": (density[density > 0.1].sum() / density.sum()).item(),
        "encoder_norm": W_enc.norm(dim=0), "encoder_decoder_cosine_sim": F.cosine_similarity(W_enc.T, W_dec, dim=1),
        "max_encoder_cosine_sim": max_cos(W_enc), "max_decoder_cosine_sim": max_cos(W_dec.T),
    }


def flat_metrics(record) -> dict:
    return {name: value for group in record["eval_result_metrics"].values() for name, value in group.items()}


def detail_column(record, name) -> torch.Tensor:
    column = torch.tensor([row[name] for row in record["eval_result_details"]], dtype=torch.float64)
    return torch.where(column == -1, math.nan, column)  # SAEBench writes NaN as -1


@pytest.mark.parametrize("activation,decoder_norm", [("relu", "forward"), ("topk", "project"),
                                                     ("jumprelu", "project")])
def test_core_metrics_match_a_dense_recomputation(model_dir, activation, decoder_norm):
    sae = make_sae(activation, decoder_norm)
    record, lm = run_saebench(model_dir, sae)
    expected = dense_reference(lm, sae.eval())
    got = flat_metrics(record)
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            column = detail_column(record, name)
            assert torch.allclose(column, value, rtol=1e-5, atol=1e-6, equal_nan=True), name
        else:
            assert got[name] == pytest.approx(value, rel=2e-4, abs=1e-6), name
    tokens = N_BATCHES * BATCH * CTX
    assert got["total_tokens_eval_reconstruction"] == tokens
    assert record["eval_result_unstructured"]["counted_tokens"] == tokens - 5  # the 5 special tokens left out
    assert 0 < got["frac_alive"] < 1 and got["l0"] > 0  # the SAE is neither dead nor dense


def test_the_record_has_saebench_layout_and_eval_json_holds_it(model_dir, tmp_path):
    sae = make_sae("topk", "project")
    evaluator = Evaluator.build(tiny_config(model_dir), {HOOK: sae}, eval_dataset=eval_batches())
    out = evaluator.evaluate(N_BATCHES * BATCH * CTX, run_dir=tmp_path, saebench=True)
    record = out["saebench"]
    assert record["eval_type_id"] == "core" and len(record["eval_result_details"]) == N
    assert record["sae_cfg_dict"]["d_sae"] == N and record["sae_cfg_dict"]["hook_name"] == HOOK
    assert record["eval_config"]["batch_size_prompts"] == BATCH and record["eval_config"]["context_size"] == CTX
    in_eval_json = json.loads((tmp_path / "eval.json").read_text())["saebench"]
    assert in_eval_json == {**json.loads(json.dumps(record)), "eval_result_details": []}  # the rows: --saebench's
    assert "eval/kl" in out and "eval/saebench" not in out  # fastsae's own metrics unchanged beside it


def test_saebench_refuses_several_saes_at_once(model_dir):
    config = load_config("embedded", [f"model.name={model_dir}", "saes.hooks=[blocks.0.hook_resid_pre,"
                                      f"{HOOK}]", f"data.context_length={CTX}", f"eval.batch_size={BATCH}",
                                      "device=cpu"])
    saes = {HOOK: make_sae("relu"), "blocks.0.hook_resid_pre": make_sae("relu", seed=1)}
    evaluator = Evaluator.build(config, saes, eval_dataset=eval_batches())
    with pytest.raises(ValueError, match="one SAE spliced alone; this eval has 2"):
        evaluator.evaluate(BATCH * CTX, saebench=True)


def test_cli_eval_writes_the_saebench_json(model_dir, tmp_path, capsys):
    sae = make_sae("topk", "project")
    sae.metadata["model"] = str(model_dir)
    sae.save_pretrained(tmp_path / "sae")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "core.json"
    assert main(["eval", "--sae", str(tmp_path / "sae"), "--tokens", "128", "--saebench", str(out),
                 "--set", f"data.source=text", "--set", f"data.path={corpus}", "--set", f"data.context_length={CTX}",
                 "--set", f"eval.batch_size={BATCH}", "--set", "device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert "SAEBench core (sae-bench 0.6.0 evals/core): kl_div_score" in printed and str(out) in printed
    record = json.loads(out.read_text())
    assert record["eval_result_metrics"]["token_stats"]["total_tokens_eval_reconstruction"] == 128


TRANSCODER = "blocks.1.ln2.hook_normalized->blocks.1.hook_mlp_out"


def make_transcoder(seed: int = 0) -> E2ESAE:
    """A TopK skip-transcoder on MLP 1 (the skip path drawn nonzero: the init's is 0)."""
    torch.manual_seed(seed)
    sae = E2ESAE(D, N, "topk", k=6, skip=True, metadata={"hook": TRANSCODER})
    with torch.no_grad():
        sae.b_enc.normal_(-0.2, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_skip.normal_(0, 0.1)
    return sae


def test_transcoder_core_metrics_compare_with_the_output_it_replaces(model_dir):
    """SAEBench's core metrics of a transcoder IN->OUT: OUT replaced (and zero-ablated), its output
    compared with the model's activation at OUT; its cfg as SAELens's TranscoderConfig names it."""
    sae = make_transcoder()
    record, lm = run_saebench(model_dir, sae, TRANSCODER)
    expected = dense_reference(lm, sae.eval(), TRANSCODER)
    got = flat_metrics(record)
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            column = detail_column(record, name)
            assert torch.allclose(column, value, rtol=1e-5, atol=1e-6, equal_nan=True), name
        else:  # the scores divide by (ablated - clean), small where a random tiny MLP is zeroed: float rounding
            assert got[name] == pytest.approx(value, rel=1e-3 if name.endswith("_score") else 2e-4, abs=1e-6), name
    cfg = record["sae_cfg_dict"]
    assert (cfg["hook_name"], cfg["hook_layer"]) == ("blocks.1.ln2.hook_normalized", 1)
    assert (cfg["d_in"], cfg["d_out"], cfg["hook_name_out"], cfg["hook_layer_out"]) == (D, D, "blocks.1.hook_mlp_out", 1)
    assert record["eval_result_unstructured"]["hook"] == TRANSCODER
    assert "d_out" not in make_sae("relu").cfg.to_dict()  # an SAE's cfg: SAELens's SAEConfig fields only


def test_cli_eval_of_a_transcoder_path_at_in_arrow_out(model_dir, tmp_path, capsys):
    """`fastsae eval --sae PATH@IN->OUT`: the "@" and the "->" parse together (also where the path
    is a run's SAE directory named IN->OUT), and the output says what a transcoder's metrics are of."""
    from fastsae import formats

    path = make_transcoder().save_pretrained(tmp_path / "saes" / TRANSCODER)
    assert formats.split_hook(f"{path}@{TRANSCODER}") == (str(path), TRANSCODER)
    assert formats.split_hook(str(path)) == (str(path), None)  # an existing path with "->" and no "@"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out, core = tmp_path / "eval", tmp_path / "core.json"
    assert main(["eval", "--sae", f"{path}@{TRANSCODER}", "--model", str(model_dir), "--tokens", "128",
                 "--out", str(out), "--saebench", str(core), "--set", "data.kind=text", "--set", f"data.path={corpus}",
                 "--set", f"data.context_length={CTX}", "--set", f"eval.batch_size={BATCH}", "--set", "device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"eval/explained_variance/{TRANSCODER}" in printed
    assert "(transcoder: mse/ and explained_variance/ of" in printed and "activation at blocks.1.hook_mlp_out" in printed
    record = json.loads((out / "eval.json").read_text())
    assert record["hooks"] == [TRANSCODER] and f"explained_variance/{TRANSCODER}" in record["metrics"]
    assert record["transcoders"][TRANSCODER]["compared_with"] == "blocks.1.hook_mlp_out"
    assert record["transcoders"][TRANSCODER]["reads"] == "blocks.1.ln2.hook_normalized"
    assert json.loads(core.read_text())["sae_cfg_dict"]["hook_name_out"] == "blocks.1.hook_mlp_out"


# ------------------------------------------------------------------------------------------------
# the SAEBench view of an SAE: cfg, unit decoder rows, dense codes

@pytest.mark.parametrize("activation,decoder_norm", [("relu", "forward"), ("topk", "forward"),
                                                     ("batchtopk", "project"), ("jumprelu", "project")])
def test_saebench_sae_is_the_same_function_with_unit_rows_and_dense_codes(activation, decoder_norm):
    sae = make_sae(activation, decoder_norm).eval()
    view = saebench_sae(sae)
    assert isinstance(view, SAEBenchSAE) and not view.training
    x = torch.randn(2, 5, D)
    code = view.encode(x)
    assert isinstance(code, torch.Tensor) and code.shape == (2, 5, N)
    assert torch.allclose(view.decode(code), sae(x), atol=1e-5) and torch.allclose(view(x), sae(x), atol=1e-5)
    assert torch.allclose(view.W_dec.norm(dim=1), torch.ones(N), atol=1e-6)
    assert view.W_dec.shape == (view.cfg.d_sae, view.cfg.d_in) and view.W_enc.shape == (D, N)
    assert (view.dtype, view.device, view.cfg.dtype, view.cfg.device) == (torch.float32, torch.device("cpu"),
                                                                          "float32", "cpu")
    assert view.cfg.hook_name == HOOK and view.cfg.hook_layer == 1 and view.cfg.to_dict()["d_in"] == D


def test_saebench_sae_refuses_what_is_not_an_e2esae():
    with pytest.raises(TypeError, match="sae must be an E2ESAE"):
        saebench_sae(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------
# against sae-bench itself (CI's second leg)

def _sae_bench():
    try:
        from sae_bench.evals.core import main as core_main
        from sae_bench.evals.core.eval_output import CoreEvalOutput
    except ImportError as error:
        pytest.skip(f"sae-bench's core eval does not import here ({error}); CI's second leg installs it")
    return core_main, CoreEvalOutput


@pytest.fixture
def general_utils():
    _sae_bench()
    from sae_bench.sae_bench_utils import general_utils

    return general_utils


def test_the_json_validates_against_saebench_core_eval_output(model_dir):
    _, CoreEvalOutput = _sae_bench()
    from pydantic import TypeAdapter

    record, _ = run_saebench(model_dir, make_sae("topk", "project"))
    validated = TypeAdapter(CoreEvalOutput).validate_python(record)
    assert json.loads(validated.to_json()) == json.loads(json.dumps(record))  # nothing dropped, nothing added
    TypeAdapter(CoreEvalOutput).validate_python({**record, "eval_result_details": []})  # eval.json's copy
    broken = json.loads(json.dumps(record))
    del broken["eval_result_metrics"]["misc_metrics"]["frac_alive"]
    with pytest.raises(Exception, match="frac_alive"):
        TypeAdapter(CoreEvalOutput).validate_python(broken)


class _Store:
    """What sae-bench's core functions read of a SAELens ActivationsStore: the batches, no scaling."""

    normalize_activations = "none"

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_batch_tokens(self, n):
        tokens = next(self.batches)
        assert tokens.shape[0] == n
        return tokens


@pytest.mark.parametrize("activation,decoder_norm", [("relu", "project"), ("topk", "forward")])
def test_saebench_own_functions_agree(model_dir, activation, decoder_norm, general_utils):
    core_main, _ = _sae_bench()
    from fastsae.model.lm import LanguageModel

    sae = make_sae(activation, decoder_norm)
    record, lm = run_saebench(model_dir, sae)
    if lm.api != "hooked":
        lm = LanguageModel.load(str(model_dir), api="hooked")  # sae-bench runs a HookedTransformer
    # a ReLU SAE with unit rows meets sae-bench's contract as it is; the others through saebench_sae.
    # load_and_format_sae is sae-bench's entry for custom SAE objects: it checks the decoder rows and
    # standardises sae.cfg in place.
    theirs = sae.eval() if (activation, decoder_norm) == ("relu", "project") else saebench_sae(sae)
    theirs.metadata["model"] = str(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its decoder-norm check warns on rows that are not unit norm
        _, theirs, _ = general_utils.load_and_format_sae("custom", theirs, "cpu")
    assert theirs.cfg.architecture_str == activation and theirs.cfg.metadata.hook_name == HOOK
    ignore = {SPECIAL}
    with torch.no_grad():
        downstream = core_main.get_downstream_reconstruction_metrics(
            theirs, lm.model, _Store(eval_batches()), compute_kl=True, compute_ce_loss=True, n_batches=N_BATCHES,
            eval_batch_size_prompts=BATCH, ignore_tokens=ignore)
        scalars, features = core_main.get_sparsity_and_variance_metrics(
            theirs, lm.model, _Store(eval_batches()), n_batches=N_BATCHES, compute_l2_norms=True,
            compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=True,
            eval_batch_size_prompts=BATCH, model_kwargs={}, ignore_tokens=ignore)
        features |= core_main.get_featurewise_weight_based_metrics(theirs)
    misc = core_main.calculate_misc_metrics(features)
    got = flat_metrics(record)
    # The scores divide differences of nearly equal means on a random model (an ablation barely moves
    # its CE): their tolerance is the means' fp32 error over the denominator.
    ce_gap = abs(downstream["ce_loss_with_ablation"] - downstream["ce_loss_without_sae"])
    kl_gap = abs(downstream["kl_div_with_ablation"])
    tolerance = {"ce_loss_score": 1e-5 * downstream["ce_loss_with_ablation"] / ce_gap,
                 "kl_div_score": 1e-5 / kl_gap}
    for name, value in {**downstream, **scalars, **misc}.items():
        assert got[name] == pytest.approx(value, rel=2e-4, abs=tolerance.get(name, 1e-6)), name
    for name in ("feature_density", "consistent_activation_heuristic", "encoder_norm", "encoder_decoder_cosine_sim",
                 "max_encoder_cosine_sim", "max_decoder_cosine_sim"):
        assert torch.allclose(detail_column(record, name), torch.tensor(features[name], dtype=torch.float64),
                              rtol=1e-5, atol=1e-6, equal_nan=True), name


def test_saebench_custom_sae_checks_pass(general_utils):
    from sae_bench.custom_saes.base_sae import BaseSAE

    sae = make_sae("topk", "forward")
    with pytest.warns(UserWarning, match="Decoder weights are not normalized"):
        assert not general_utils.check_decoder_norms(sae.W_dec.data)  # why saebench_sae exists
    view = saebench_sae(sae)
    assert BaseSAE.check_decoder_norms(view) and general_utils.check_decoder_norms(view.W_dec.data)
    # BaseSAE.test_sae's checks, without its hub model
    assert view.W_dec.shape == (view.cfg.d_sae, view.cfg.d_in) and view.W_enc.shape == (view.cfg.d_in, view.cfg.d_sae)
    acts = torch.randn(1, 7, D)
    assert torch.allclose(view(acts.flatten(0, 1)).reshape(acts.shape), view.decode(view.encode(acts)))


def test_a_transcoder_of_another_width_has_no_encoder_decoder_cosine():
    """W_enc's columns [d_in] and W_dec's rows [d_out] of a transcoder into a wider hook live in
    different spaces: SAEBench's per-latent encoder-decoder cosine is NaN there (the others stay)."""
    from fastsae.train.saebench_core import CoreMetrics

    sae = E2ESAE(D, N, "topk", k=6, d_out=4 * D, metadata={"hook": "blocks.1.ln2.hook_normalized->blocks.1.mlp.hook_post"})
    weights = CoreMetrics(sae, sae.metadata["hook"], [])._weight_metrics()
    assert weights["encoder_decoder_cosine_sim"].isnan().all()
    assert weights["max_decoder_cosine_sim"].shape == weights["max_encoder_cosine_sim"].shape == (N,)
    assert not weights["max_decoder_cosine_sim"].isnan().any()
