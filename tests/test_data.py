"""fastsae.train.data: token streams from local text, token files and local HF datasets (no hub)."""

import numpy as np
import pytest
import torch

from fastsae.train.data import build_token_stream
from tests.helpers_models import train_tiny_tokenizer

T, B = 8, 3


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_text_packing(tmp_path, tokenizer):
    docs = ["the quick brown fox jumps over the lazy dog. " * 3, "a sparse autoencoder reads the residual stream. " * 4]
    for i, d in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(d)
    expected = []
    for d in docs:
        expected += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    n_windows = len(expected) // T
    spec = {"kind": "text", "path": str(tmp_path / "*.txt"), "eval_fraction": 0.25}
    train = build_token_stream(spec, tokenizer, context_length=T, batch_size=1, split="eval")
    n_eval = max(1, round(n_windows * 0.25))
    # eval: the last windows, in order, then it loops
    got = torch.cat(take(train, n_eval)).flatten().tolist()
    assert got == expected[(n_windows - n_eval) * T : n_windows * T]
    stream = build_token_stream(spec, tokenizer, context_length=T, batch_size=B, seed=1)
    windows = torch.cat(take(stream, 10))
    assert windows.shape == (30, T) and windows.dtype == torch.long
    n_train = n_windows - n_eval
    # every train window is an aligned slice of the packed tokens, each epoch a permutation
    allowed = {tuple(expected[i * T : (i + 1) * T]) for i in range(n_train)}
    assert {tuple(w) for w in windows[:n_train].tolist()} == allowed
    assert stream.epoch == 30 // n_train


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".bin"])
def test_token_files(tmp_path, suffix):
    data = np.arange(1000)
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".npy":
        np.save(path, data.astype(np.int32))
    elif suffix == ".pt":
        torch.save(torch.from_numpy(data), path)
    else:
        data.astype(np.uint16).tofile(path)
    stream = build_token_stream({"kind": "tokens", "path": str(path)}, None, context_length=T, batch_size=B, seed=0)
    batch = next(stream)
    assert batch.shape == (B, T) and batch.dtype == torch.long
    for row in batch.tolist():  # rows are aligned windows of the array
        assert row == data[row[0] : row[0] + T].tolist() and row[0] % T == 0
    # deterministic shuffle: same seed same order, other seed other order
    again = build_token_stream({"kind": "tokens", "path": str(path)}, None, context_length=T, batch_size=B, seed=0)
    other = build_token_stream({"kind": "tokens", "path": str(path)}, None, context_length=T, batch_size=B, seed=1)
    assert torch.equal(next(again), batch)
    assert not torch.equal(next(other), batch)


def test_resume_local(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(200))
    spec = {"kind": "tokens", "path": str(tmp_path / "t.npy")}
    a = build_token_stream(spec, None, context_length=T, batch_size=B, seed=3)
    take(a, 9)  # past the first epoch (23 train windows)
    state = a.state_dict()
    expected = take(a, 12)
    b = build_token_stream(spec, None, context_length=T, batch_size=B, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(b, 12), expected))
    assert b.epoch == a.epoch


def _hf_rows():
    return {"text": [f"document {i}: the quick brown fox jumps over the lazy dog" for i in range(40)]}


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_saved_dataset_and_resume(tmp_path, tokenizer, streaming):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict(_hf_rows()).save_to_disk(str(tmp_path / "ds"))
    spec = {"kind": "hf", "name": str(tmp_path / "ds"), "streaming": streaming}
    a = build_token_stream(spec, tokenizer, context_length=T, batch_size=B)
    first = next(a)
    packed = []
    for text in _hf_rows()["text"]:
        packed += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert first.flatten().tolist() == packed[: B * T]
    take(a, 5)
    state = a.state_dict()
    expected = take(a, 60)  # runs past the end of the data: the stream loops
    assert a.epoch >= 1
    b = build_token_stream(spec, tokenizer, context_length=T, batch_size=B)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(b, 60), expected))


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_eval_examples_hold_out_the_head_of_a_shared_split(tmp_path, tokenizer, streaming):
    datasets = pytest.importorskip("datasets")
    # example i is T copies of token i: a window names the example it came from
    datasets.Dataset.from_dict({"input_ids": [[i] * T for i in range(12)]}).save_to_disk(str(tmp_path / "ds"))
    spec = {"kind": "hf", "name": str(tmp_path / "ds"), "streaming": streaming, "eval_examples": 3}
    train = build_token_stream(spec, tokenizer, context_length=T, batch_size=1, split="train")
    evals = build_token_stream(spec, tokenizer, context_length=T, batch_size=1, split="eval")
    train_ids = {int(next(train)[0, 0]) for _ in range(20)}  # loops over its 9 examples
    eval_ids = [int(next(evals)[0, 0]) for _ in range(7)]
    assert train_ids == set(range(3, 12))
    assert eval_ids == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="eval_examples"):
        build_token_stream({**spec, "eval_split": "validation"}, tokenizer, context_length=T, batch_size=1)


def test_hf_json_builder_and_pretokenized(tmp_path, tokenizer):
    pytest.importorskip("datasets")
    import json

    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"input_ids": list(range(i * 5, i * 5 + 5))}) + "\n")
    spec = {"kind": "hf", "name": "json", "data_files": str(tmp_path / "d.jsonl")}
    stream = build_token_stream(spec, tokenizer, context_length=T, batch_size=2)
    assert next(stream).flatten().tolist() == list(range(16))  # used as-is: no EOS between rows

    with open(tmp_path / "t.jsonl", "w") as f:
        for row in _hf_rows()["text"][:5]:
            f.write(json.dumps({"body": row}) + "\n")
    spec = {"kind": "hf", "name": "json", "data_files": str(tmp_path / "t.jsonl"), "column": "body"}
    assert next(build_token_stream(spec, tokenizer, context_length=T, batch_size=2)).shape == (2, T)
    spec["column"] = "nope"
    with pytest.raises(ValueError, match="no column 'nope'"):
        next(build_token_stream(spec, tokenizer, context_length=T, batch_size=2))


def test_embedded_stream(tokenizer):
    train = build_token_stream({"kind": "embedded"}, tokenizer, context_length=32, batch_size=2)
    assert next(train).shape == (2, 32)
    eval_a = build_token_stream({"kind": "embedded"}, tokenizer, context_length=32, batch_size=2, split="eval")
    eval_b = build_token_stream({"kind": "embedded"}, tokenizer, context_length=32, batch_size=2, split="eval")
    assert torch.equal(next(eval_a), next(eval_b))


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"kind": "parquet"}, "'kind' must be one of"),
        ({"path": "x"}, "'kind' must be one of"),
        ({"kind": "text", "path": "x", "colum": "text"}, r"unknown key\(s\) \['colum'\]"),
        ({"kind": "text"}, "needs 'path'"),
        ({"kind": "hf"}, "needs 'name'"),
        ({"kind": "tokens", "path": "/nonexistent/*.npy"}, "matches no file"),
        ({"kind": "tokens", "path": "x", "eval_fraction": 2}, "eval_fraction"),
        ("gpt2", "must be a dict"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        build_token_stream(spec, None, context_length=T, batch_size=B)


def test_bad_arguments(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(5))
    spec = {"kind": "tokens", "path": str(tmp_path / "t.npy")}
    with pytest.raises(ValueError, match="fewer than one window"):
        build_token_stream(spec, None, context_length=T, batch_size=B)
    with pytest.raises(ValueError, match="split must be one of"):
        build_token_stream(spec, None, context_length=T, batch_size=B, split="test")
    with pytest.raises(ValueError, match="context_length must be a positive int"):
        build_token_stream(spec, None, context_length=0, batch_size=B)
    with pytest.raises(ValueError, match="pass the model's tokenizer"):
        build_token_stream({"kind": "text", "path": str(tmp_path / "t.npy")}, None, context_length=T, batch_size=B)
