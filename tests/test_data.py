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
    spec = {"source": "text", "path": str(tmp_path / "*.txt"), "eval_fraction": 0.25}
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
    spec = {"source": "tokens", "path": str(path), **({"dtype": "uint16"} if suffix == ".bin" else {})}
    stream = build_token_stream(spec, None, context_length=T, batch_size=B, seed=0)
    batch = next(stream)
    assert batch.shape == (B, T) and batch.dtype == torch.long
    for row in batch.tolist():  # rows are aligned windows of the array
        assert row == data[row[0] : row[0] + T].tolist() and row[0] % T == 0
    # deterministic shuffle: same seed same order, other seed other order
    again = build_token_stream(spec, None, context_length=T, batch_size=B, seed=0)
    other = build_token_stream(spec, None, context_length=T, batch_size=B, seed=1)
    assert torch.equal(next(again), batch)
    assert not torch.equal(next(other), batch)


def test_resume_local(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(200))
    spec = {"source": "tokens", "path": str(tmp_path / "t.npy")}
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
    spec = {"source": "hf", "name": str(tmp_path / "ds"), "streaming": streaming}
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
    spec = {"source": "hf", "name": str(tmp_path / "ds"), "streaming": streaming, "eval_examples": 3}
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
    spec = {"source": "hf", "name": "json", "data_files": str(tmp_path / "d.jsonl")}
    stream = build_token_stream(spec, tokenizer, context_length=T, batch_size=2)
    assert next(stream).flatten().tolist() == list(range(16))  # used as-is: no EOS between rows

    with open(tmp_path / "t.jsonl", "w") as f:
        for row in _hf_rows()["text"][:5]:
            f.write(json.dumps({"body": row}) + "\n")
    spec = {"source": "hf", "name": "json", "data_files": str(tmp_path / "t.jsonl"), "column": "body"}
    assert next(build_token_stream(spec, tokenizer, context_length=T, batch_size=2)).shape == (2, T)
    spec["column"] = "nope"
    with pytest.raises(ValueError, match="no column 'nope'"):
        next(build_token_stream(spec, tokenizer, context_length=T, batch_size=2))


def test_embedded_stream(tokenizer):
    train = build_token_stream({"source": "embedded"}, tokenizer, context_length=32, batch_size=2)
    assert next(train).shape == (2, 32)
    eval_a = build_token_stream({"source": "embedded"}, tokenizer, context_length=32, batch_size=2, split="eval")
    eval_b = build_token_stream({"source": "embedded"}, tokenizer, context_length=32, batch_size=2, split="eval")
    assert torch.equal(next(eval_a), next(eval_b))


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"source": "parquet"}, "'source' must be one of"),
        ({"path": "x"}, "'source' must be one of"),
        ({"source": "text", "path": "x", "colum": "text"}, r"unknown key\(s\) \['colum'\]"),
        ({"source": "text"}, "needs 'path'"),
        ({"source": "hf"}, "needs 'name'"),
        ({"source": "tokens", "path": "/nonexistent/*.npy"}, "matches no file"),
        ({"source": "tokens", "path": "x", "eval_fraction": 2}, "eval_fraction"),
        ("gpt2", "must be a dict"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        build_token_stream(spec, None, context_length=T, batch_size=B)


def test_bad_arguments(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(5))
    spec = {"source": "tokens", "path": str(tmp_path / "t.npy")}
    with pytest.raises(ValueError, match="fewer than one window"):
        build_token_stream(spec, None, context_length=T, batch_size=B)
    with pytest.raises(ValueError, match="split must be one of"):
        build_token_stream(spec, None, context_length=T, batch_size=B, split="test")
    with pytest.raises(ValueError, match="context_length must be a positive int"):
        build_token_stream(spec, None, context_length=0, batch_size=B)
    with pytest.raises(ValueError, match="pass the model's tokenizer"):
        build_token_stream({"source": "text", "path": str(tmp_path / "t.npy")}, None, context_length=T, batch_size=B)


# ---------------------------------------------------------------- the data people have (issue 9)


def test_bin_without_dtype_is_refused_not_guessed(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(70_000, 70_400, dtype=np.uint32).tofile(path)  # ids above 65,535: uint16 would misread them
    spec = {"source": "tokens", "path": str(path)}
    with pytest.raises(ValueError, match=r"t\.bin is a raw token file without a header: set data\.dtype"):
        build_token_stream(spec, None, context_length=T, batch_size=B)
    stream = build_token_stream({**spec, "dtype": "uint32"}, None, context_length=T, batch_size=B)
    assert next(stream).min() >= 70_000
    with pytest.raises(ValueError, match="not a whole number of uint64 tokens"):
        np.arange(3, dtype=np.uint32).tofile(tmp_path / "odd.bin")
        build_token_stream({**spec, "path": str(tmp_path / "odd.bin"), "dtype": "uint64"}, None, context_length=T,
                           batch_size=B)
    with pytest.raises(ValueError, match="not an integer dtype"):
        build_token_stream({**spec, "dtype": "float32"}, None, context_length=T, batch_size=B)


def test_token_ids_outside_the_vocabulary_name_the_file_and_the_id(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(100))
    bad = np.arange(100)
    bad[37] = 5000
    np.save(tmp_path / "b.npy", bad)
    spec = {"source": "tokens", "path": str(tmp_path / "*.npy"), "eval_fraction": 0.1}
    stream = build_token_stream(spec, None, context_length=T, batch_size=24, vocab_size=300)
    with pytest.raises(ValueError, match=r"b\.npy: token id 5000 at position 37 is outside the model's vocabulary of 300"):
        next(stream)
    # without a vocabulary nothing is checked; within it nothing is refused
    next(build_token_stream(spec, None, context_length=T, batch_size=24))
    next(build_token_stream({**spec, "path": str(tmp_path / "a.npy")}, None, context_length=T, batch_size=B,
                            vocab_size=300))


def test_jsonl_text_is_read_as_json_lines(tmp_path, tokenizer):
    import json

    docs = ["the quick brown fox", "reads the residual stream"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    spec = {"source": "text", "path": str(tmp_path / "d.jsonl"), "eval_fraction": 0.25}
    stream = build_token_stream(spec, tokenizer, context_length=2, batch_size=1, split="eval")
    expected = []
    for d in docs:
        expected += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    n_windows = len(expected) // 2
    n_eval = max(1, round(n_windows * 0.25))
    got = torch.cat(take(stream, n_eval)).flatten().tolist()
    assert got == expected[(n_windows - n_eval) * 2: n_windows * 2]  # no JSON syntax in the tokens
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: expected an object with a text field 'text'"):
        build_token_stream(spec, tokenizer, context_length=2, batch_size=1)
    assert next(build_token_stream({**spec, "column": "body"}, tokenizer, context_length=1, batch_size=1)).numel() == 1


def test_prepend_bos_starts_every_window_with_bos(tmp_path, tokenizer):
    np.save(tmp_path / "t.npy", np.arange(1, 201))
    spec = {"source": "tokens", "path": str(tmp_path / "t.npy"), "prepend_bos": True}
    stream = build_token_stream(spec, tokenizer, context_length=T, batch_size=B)
    for row in next(stream).tolist():
        assert row[0] == tokenizer.bos_token_id
        assert row[1:] == list(range(row[1], row[1] + T - 1)) and (row[1] - 1) % (T - 1) == 0
    with pytest.raises(ValueError, match="'prepend_bos' needs the model's tokenizer"):
        build_token_stream(spec, None, context_length=T, batch_size=B)
    with pytest.raises(ValueError, match="'prepend_bos' must be true or false"):
        build_token_stream({**spec, "prepend_bos": "yes"}, tokenizer, context_length=T, batch_size=B)


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("column", ["tokens", "input_ids"])
def test_hf_pretokenized_columns_bos_and_vocab(tmp_path, tokenizer, column):
    pytest.importorskip("datasets")
    rows = [{column: list(range(i * 5, i * 5 + 5)), "other": "x"} for i in range(10)]
    spec = {"source": "hf", "name": "json", "data_files": _write_jsonl(tmp_path / "d.jsonl", rows)}
    assert next(build_token_stream(spec, None, context_length=T, batch_size=2)).flatten().tolist() == list(range(16))
    with_bos = next(build_token_stream({**spec, "prepend_bos": True}, tokenizer, context_length=T, batch_size=2))
    assert with_bos.tolist() == [[tokenizer.bos_token_id, *range(7)], [tokenizer.bos_token_id, *range(7, 14)]]
    with pytest.raises(ValueError, match=rf"d\.jsonl'\): token id 40 in column '{column}' of example 8 .* vocabulary of 40"):
        take(build_token_stream(spec, None, context_length=T, batch_size=2, vocab_size=40), 4)


def test_hf_data_files_list_and_dict(tmp_path):
    pytest.importorskip("datasets")
    a = _write_jsonl(tmp_path / "a.jsonl", [{"tokens": [1] * T}] * 2)
    b = _write_jsonl(tmp_path / "b.jsonl", [{"tokens": [2] * T}] * 2)
    stream = build_token_stream({"source": "hf", "name": "json", "data_files": [a, b], "streaming": False}, None,
                                context_length=T, batch_size=4)
    assert next(stream)[:, 0].tolist() == [1, 1, 2, 2]
    spec = {"source": "hf", "name": "json", "data_files": {"train": [a], "validation": b}, "eval_split": "validation"}
    assert next(build_token_stream(spec, None, context_length=T, batch_size=1))[0, 0] == 1
    assert next(build_token_stream(spec, None, context_length=T, batch_size=1, split="eval"))[0, 0] == 2
    with pytest.raises(ValueError, match="'data_files' must be a path, a list of paths, or a dict"):
        build_token_stream({**spec, "data_files": {"train": 3}}, None, context_length=T, batch_size=1)


@pytest.mark.parametrize("iterable", [False, True])
def test_datasets_objects_become_resumable_streams(tokenizer, iterable):
    datasets = pytest.importorskip("datasets")
    from fastsae.train.data import as_token_stream

    ds = datasets.Dataset.from_dict({"tokens": [[i] * T for i in range(12)]})
    if iterable:
        ds = ds.to_iterable_dataset()
    a = as_token_stream(ds, context_length=T, batch_size=2, vocab_size=300)
    assert next(a)[:, 0].tolist() == [0, 1]
    take(a, 2)
    state = a.state_dict()
    expected = take(a, 8)  # past the end: it loops
    b = as_token_stream(ds, context_length=T, batch_size=2)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(b, 8), expected))
    text = datasets.Dataset.from_dict(_hf_rows())
    assert next(as_token_stream(text, tokenizer, context_length=T, batch_size=2)).shape == (2, T)
    with pytest.raises(ValueError, match="the Dataset passed as dataset: token id 10 .* vocabulary of 10"):
        take(as_token_stream(datasets.Dataset.from_dict({"tokens": [[i] * T for i in range(12)]}),
                             context_length=T, batch_size=2, vocab_size=10), 6)


def test_plain_batches_and_dataloaders_of_dicts():
    from fastsae.train.data import as_token_stream

    tensors = [torch.arange(2 * T).view(2, T) for _ in range(3)]
    assert [b.tolist() for b in as_token_stream(tensors, context_length=T, batch_size=2)] == [t.tolist() for t in tensors]
    rows = [{"input_ids": torch.full((T,), i)} for i in range(4)]
    loader = torch.utils.data.DataLoader(rows, batch_size=2)
    got = list(as_token_stream(loader, context_length=T, batch_size=2, name="eval_dataset"))
    assert [b[:, 0].tolist() for b in got] == [[0, 1], [2, 3]] and got[0].dtype == torch.long
    with pytest.raises(ValueError, match="eval_dataset: batch 1 holds token id 3, outside the model's vocabulary of 3"):
        list(as_token_stream(loader, context_length=T, batch_size=2, vocab_size=3, name="eval_dataset"))
    with pytest.raises(ValueError, match="batch 0 is a dict without a token column"):
        list(as_token_stream([{"text": "x"}], context_length=T, batch_size=2))
    with pytest.raises(ValueError, match=r"batch 0 must be an integer tensor \[batch, ctx\]"):
        list(as_token_stream([torch.zeros(2, T)], context_length=T, batch_size=2))
    with pytest.raises(TypeError, match="dataset must be a TokenStream, a datasets.Dataset"):
        as_token_stream("data.txt", context_length=T, batch_size=2)


def test_config_takes_data_files_lists_and_dicts_and_prepend_bos():
    from fastsae.train.config import ConfigError, load_config

    base = ["data.source=hf", "data.name=json"]
    cfg = load_config({}, [*base, "data.data_files={train: [a.jsonl, b.jsonl], validation: c.jsonl}",
                           "data.prepend_bos=true"])
    assert cfg.data_spec()["data_files"] == {"train": ["a.jsonl", "b.jsonl"], "validation": "c.jsonl"}
    assert cfg.data_spec()["prepend_bos"] is True
    assert load_config({}, [*base, "data.data_files=[a.jsonl, b.jsonl]"]).data.data_files == ["a.jsonl", "b.jsonl"]
    with pytest.raises(ConfigError, match="data.data_files must be str or a list of str or a mapping"):
        load_config({}, [*base, "data.data_files=3"])


def test_spec_kind_is_read_as_source_with_a_deprecation_warning(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(200))
    path = str(tmp_path / "t.npy")
    with pytest.warns(DeprecationWarning, match="now 'source'"):
        old = build_token_stream({"kind": "tokens", "path": path}, None, context_length=T, batch_size=B)
    new = build_token_stream({"source": "tokens", "path": path}, None, context_length=T, batch_size=B)
    assert torch.equal(next(old), next(new))
    with pytest.raises(ValueError, match=r"both 'kind' \('text'\) and 'source' \('tokens'\)"):
        build_token_stream({"kind": "text", "source": "tokens", "path": path}, None, context_length=T, batch_size=B)
