"""The `fastsae` command on a tiny model and a tiny text corpus: train, resume, eval, presets, errors."""

import json

import pytest

from fastsae.cli import main
from fastsae.train import checkpoint as ckpt
from fastsae.train.metrics import read_metrics
from helpers_models import TINY_TEXT, save_tiny_gpt2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_gpt2(root / "model", n_layer=2, n_embd=32, n_ctx=64)
    corpus = root / "corpus.txt"
    corpus.write_text(TINY_TEXT * 40)
    config = root / "tiny.yaml"
    config.write_text(f"""# a tiny e2e run for the CLI tests
name: tiny
device: cpu
model: {{name: {model}}}
saes: {{hooks: [blocks.1.hook_resid_pre], n_latents: 64}}
data: {{source: text, path: {corpus}, context_length: 16}}
optim: {{n_tokens: 384, batch_size: 4, warmup_samples: 4}}
eval: {{n_tokens: 64, batch_size: 4}}
log: {{every: 1, progress: false}}
""")
    return root, config


def test_train_then_eval(setup, capsys):
    root, config = setup
    run = root / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--set", "optim.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "final metrics on held-out data" in out and "ce_increase" in out and "l0/blocks.1.hook_resid_pre" in out
    assert ckpt.latest_checkpoint(run).name == "step_00000006"
    assert "lr: 0.001" in (run / "config.yaml").read_text()
    assert main(["eval", str(run), "--tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert "step 6" in out and "kl" in out and "ce_increase" in out


def test_resume_continues_the_run(setup, capsys):
    root, config = setup
    run = root / "resumed"
    assert main(["train", str(config), "--run-dir", str(run), "--max-steps", "2"]) == 0
    assert ckpt.latest_checkpoint(run).name == "step_00000002"
    assert main(["train", "--resume", str(run)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert ckpt.latest_checkpoint(run).name == "step_00000006"
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_presets_list_and_show(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "embedded" in out and "gpt2-e2e" in out and "tinystories-e2e" in out
    assert main(["presets", "--show", "gpt2-e2e-ds"]) == 0
    assert "blocks.11.hook_resid_pre" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "no-such-preset"], "neither a config file nor a preset"),
    (["train", "embedded", "--set", "optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["eval", "/nonexistent/run"], "not a run directory"),
])
def test_errors_are_one_line_and_exit_2(argv, message, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_bad_hook_is_reported(setup, capsys):
    root, config = setup
    assert main(["train", str(config), "--run-dir", str(root / "bad"), "--set",
                 "saes.hooks=[blocks.7.hook_resid_pre]"]) == 2
    assert "blocks.7.hook_resid_pre" in capsys.readouterr().err


def test_metrics_jsonl_is_json_lines(setup):
    root, _ = setup
    records = read_metrics(root / "run")
    assert records and all(isinstance(r["step"], int) for r in records)
    json.dumps(records)


def test_a_used_run_dir_is_refused_unless_overwrite(setup, capsys):
    root, config = setup
    run = root / "used"
    assert main(["train", str(config), "--run-dir", str(run), "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(["train", str(config), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and f"--resume {run}" in err and "Traceback" not in err
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert main(["train", str(config), "--run-dir", str(run), "--max-steps", "1", "--overwrite"]) == 0
    assert "moved the old run" in capsys.readouterr().out
    assert len(list(root.glob("used.replaced-*"))) == 1 and [r["step"] for r in read_metrics(run)] == [1]


def test_resume_with_set_keeps_config_yaml(setup, capsys):
    root, config = setup
    run = root / "overridden"
    assert main(["train", str(config), "--run-dir", str(run), "--max-steps", "2"]) == 0
    original = (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "--set", "eval.n_tokens=32"]) == 0
    assert (run / "config.yaml").read_text() == original
    assert "eval.n_tokens=32" in (run / "overrides.yaml").read_text()


def test_a_hub_model_offline_is_one_line(capsys, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(["train", "gpt2-e2e", "--set", "model.name=openai-community/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - start < 10
    assert "needs hub access" in err and "local directory" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_device_cuda_without_cuda_is_a_config_error(setup, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    root, config = setup
    assert main(["train", str(config), "--run-dir", str(root / "cuda"), "--set", "device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "device='cuda' but CUDA is not available" in err and "Traceback" not in err


def test_a_k_larger_than_the_dictionary_is_one_config_error(setup, capsys):
    """saes.k beyond n_latents (known only once the model's width sets it from saes.ratio): one
    line naming the key and the size, exit code 2, no traceback."""
    root, config = setup
    code = main(["train", str(config), "--run-dir", str(root / "bad-k"), "--set", "saes.n_latents=null",
                 "--set", "saes.ratio=16", "--set", "saes.activation=topk", "--set", "saes.k=100000"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "k must be in [1, n_latents=512]" in err and "saes.ratio=16 x d_model=32" in err
