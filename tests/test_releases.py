"""Released SAEs by name (fastsae.formats.releases): the registry, the converters, the resolver.

Offline: a registry fixture (a YAML in SAELens's schema, added through FASTSAE_RELEASES) names
tiny SAEs written in every format fastsae converts, in a fake hub (one folder per repository);
a local resolver replaces resolve_file, the one function that touches the hub. Each release must
load to the same SAE as the file loaded directly. The real resolver is checked against a Hugging
Face cache laid out in a temporary directory (cached files, revision pins, the offline message).
Where sae-lens is installed (CI's second leg) its registry is read too and checked against
SAELens's own reader.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fastsae import E2ESAE
from fastsae.cli import main
from fastsae.formats import releases
from test_formats import D, HOOK, inputs, make_sae, rel_err, write_e2e_sae_run, write_saelens_dir

E2E_HOOKS = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]


def write_hub(root: Path) -> dict:
    """A fake hub under ``root`` (root/<repo_id>/<files>) holding one release per converter, and
    the registry naming them. Returns {release: (sae_id, the local file or directory)}."""
    saelens_dir = write_saelens_dir(root / "org/saelens-saes" / "layer_1", "topk", seed=5)
    fastsae_dir = make_sae("relu", "forward", seed=6).save_pretrained(root / "org/fastsae-saes" / "e2e" / "l1")
    sparsify_dir = make_sae("topk", "project", seed=7).save_pretrained(root / "org/sparsify-saes" / "layers.0",
                                                                       format="sparsify")
    weights = sparsify_dir / "sae.safetensors"  # as sparsify writes it: without fastsae's header entry
    save_file(load_file(str(weights)), str(weights))
    write_e2e_sae_run(root / "org/e2e-saes" / "run", E2E_HOOKS, samples=(100,))
    registry = {
        "test-saelens": {"repo_id": "org/saelens-saes", "model": "gpt2", "conversion_func": None,
                         "saes": [{"id": HOOK, "path": "layer_1", "l0": 4.0, "neuronpedia": "gpt2/1-test"}]},
        "test-fastsae": {"repo_id": "org/fastsae-saes", "model": "tiny-model", "conversion_func": "fastsae",
                         "revision": "v1", "saes": [{"id": "e2e-layer-1", "path": "e2e/l1"}]},
        "test-sparsify": {"repo_id": "org/sparsify-saes", "model": "tiny-model", "conversion_func": "sparsify",
                          "saes": [{"id": "blocks.0.hook_resid_post", "path": "layers.0"}]},
        "test-e2e-sae": {"repo_id": "org/e2e-saes", "model": "gpt2", "conversion_func": "e2e_sae",
                         "saes": [{"id": hook, "path": "run/samples_100.pt"} for hook in E2E_HOOKS]},
        "test-gemma-scope": {"repo_id": "google/gemma-scope-2b-pt-res", "model": "gemma-2-2b",
                             "conversion_func": "gemma_2", "saes": [{"id": "layer_1/width_16k", "path": "layer_1"}]},
    }
    (root / "registry.yaml").write_text(yaml.safe_dump(registry))
    return {"test-saelens": (HOOK, saelens_dir), "test-fastsae": ("e2e-layer-1", fastsae_dir),
            "test-sparsify": ("blocks.0.hook_resid_post", sparsify_dir),
            "test-e2e-sae": (E2E_HOOKS[1], root / "org/e2e-saes" / "run" / "samples_100.pt")}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake hub, its registry added through FASTSAE_RELEASES, and a local resolver that records
    what it was asked for."""
    root = tmp_path / "hub"
    local = write_hub(root)
    monkeypatch.setenv(releases.REGISTRY_VARIABLE, str(root / "registry.yaml"))
    asked = []

    def resolve(repo_id, filename, revision=None):
        asked.append((repo_id, filename, revision))
        path = root / repo_id / filename
        if not path.is_file():
            raise FileNotFoundError(f"{repo_id} has no file {filename}")
        return path

    monkeypatch.setattr(releases, "resolve_file", resolve)
    return local, asked


def assert_same_sae(a: E2ESAE, b: E2ESAE):
    assert (a.activation, a.k, a.decoder_norm, a.d_in, a.n_latents) == (b.activation, b.k, b.decoder_norm, b.d_in,
                                                                        b.n_latents)
    for name in a.tensor_names():
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    x = inputs(d=a.d_in)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("release", ["test-saelens", "test-fastsae", "test-sparsify", "test-e2e-sae"])
def test_each_converter_loads_a_release_as_its_file(hub, release):
    local, asked = hub
    sae_id, path = local[release]
    by_name = E2ESAE.from_pretrained(release, sae_id=sae_id)
    hook = sae_id if release == "test-e2e-sae" else None  # the e2e_sae file holds two SAEs
    assert_same_sae(by_name, E2ESAE.from_pretrained(path, hook=hook))
    assert_same_sae(E2ESAE.from_pretrained(f"{release}:{sae_id}"), by_name)  # the one-string form
    facts = by_name.metadata["release"]
    assert facts["release"] == release and facts["sae_id"] == sae_id and facts["registry"].endswith("registry.yaml")
    assert by_name.metadata["hook"] and by_name.metadata["model"]
    assert {repo for repo, _, _ in asked} == {releases.get_release(release).repo_id}


def test_the_release_names_what_the_files_do_not(hub):
    sparsify = E2ESAE.from_pretrained("test-sparsify", sae_id="blocks.0.hook_resid_post")
    assert sparsify.metadata["hook"] == "blocks.0.hook_resid_post"  # from the id: sparsify files name no hook
    assert sparsify.metadata["model"] == "tiny-model"  # from the registry entry
    saelens = E2ESAE.from_pretrained("test-saelens", sae_id=HOOK)
    assert saelens.metadata["model"] == "gpt2" and saelens.cfg.neuronpedia_id == "gpt2/1-test"
    assert saelens.cfg.hook_name == HOOK and saelens.cfg.hook_layer == 1 and saelens.cfg.d_sae == saelens.n_latents


def test_revision_pins_pass_to_the_resolver(hub):
    _, asked = hub
    E2ESAE.from_pretrained("test-fastsae", sae_id="e2e-layer-1")
    assert {revision for _, _, revision in asked} == {"v1"}  # the registry's pin
    asked.clear()
    E2ESAE.from_pretrained("test-fastsae", sae_id="e2e-layer-1", revision="abc123")
    assert {revision for _, _, revision in asked} == {"abc123"}  # the caller's wins
    with pytest.raises(ValueError, match="revision is for released SAEs"):
        E2ESAE.from_pretrained(hub[0]["test-fastsae"][1], revision="abc123")


def test_bad_names_are_one_clear_error(hub):
    with pytest.raises(ValueError, match="no release named 'test-saelen'.*did you mean test-saelens"):
        E2ESAE.from_pretrained("test-saelen", sae_id=HOOK)
    with pytest.raises(ValueError, match="has no SAE 'blocks.9.hook_resid_pre'; it has 1"):
        E2ESAE.from_pretrained("test-saelens", sae_id="blocks.9.hook_resid_pre")
    with pytest.raises(ValueError, match="conversion_func 'gemma_2', which fastsae has no converter for"):
        E2ESAE.from_pretrained("test-gemma-scope:layer_1/width_16k")
    with pytest.raises(FileNotFoundError, match="'no-such-release' names no release"):
        E2ESAE.from_pretrained("no-such-release:x")
    with pytest.raises(ValueError, match="reads 'blocks.1.hook_resid_pre', not hook 'blocks.3.hook_resid_pre'"):
        E2ESAE.from_pretrained("test-saelens", sae_id=HOOK, hook="blocks.3.hook_resid_pre")


def test_registry_fields_are_checked(tmp_path):
    bad = {"r": {"repo_id": "a/b", "model": "m", "saes": [{"id": "x"}]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"release 'r' .*needs an id and a path"):
        releases.load_registry([("test", tmp_path / "bad.yaml")])
    bad = {"r": {"repo_id": "a/b", "model": "m", "saes": [{"id": "x", "path": "p", "l0": "many"}]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="l0 must be a number"):
        releases.load_registry([("test", tmp_path / "bad.yaml")])


def test_later_registries_replace_earlier_ones(tmp_path):
    for name, repo in (("a.yaml", "first/repo"), ("b.yaml", "second/repo")):
        (tmp_path / name).write_text(yaml.safe_dump({"r": {"repo_id": repo, "model": "m",
                                                           "saes": [{"id": "x", "path": 3}]}}))
    registry = releases.load_registry([("a", tmp_path / "a.yaml"), ("b", tmp_path / "b.yaml")])
    assert registry["r"].repo_id == "second/repo" and registry["r"].source == "b"
    assert registry["r"].saes["x"].path == "3"  # an int path is read as a string, as SAELens does


def test_shipped_registry_reads_and_names_converters():
    shipped = releases.load_registry([("fastsae", releases.OWN_REGISTRY)])
    assert {"gpt2-small-res_sce-ajt", "gpt2-small-res_scl-ajt", "eleuther-pythia-160m-res-32k"} <= set(shipped)
    assert all(release.converter is not None for release in shipped.values())
    paper = shipped["gpt2-small-res_sce-ajt"]
    assert paper.converter.format == "saelens" and list(paper.saes) == [f"blocks.{n}.hook_resid_pre" for n in (2, 6, 10)]
    assert shipped["eleuther-pythia-160m-res-32k"].saes["blocks.3.hook_resid_post"].path == "layers.3"


# ------------------------------------------------------------------------------------------------
# the real resolver: the Hugging Face cache, revisions, offline

def fake_hf_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache layout: models--ORG--NAME/refs/main -> commit, snapshots/COMMIT/files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_resolver_reads_the_cache_offline_and_pins_revisions(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    fake_hf_cache(cache, "org/cached", commit, {"sae/cfg.json": b"{}"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = releases.resolve_file("org/cached", "sae/cfg.json")
    assert found.read_bytes() == b"{}" and commit in str(found)
    assert releases.resolve_file("org/cached", "sae/cfg.json", revision=commit) == found
    with pytest.raises(releases.ReleaseNotCachedError, match="at revision feedface.*HF_HUB_OFFLINE is set"):
        releases.resolve_file("org/cached", "sae/cfg.json", revision="feedface" * 5)


def test_a_release_not_in_the_cache_is_one_line_offline(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(releases.ReleaseNotCachedError) as error:
        E2ESAE.from_pretrained("gpt2-small-res_sce-ajt", sae_id="blocks.6.hook_resid_pre")
    message = str(error.value)
    assert "\n" not in message and "release 'gpt2-small-res_sce-ajt'" in message
    assert "neuronpedia/gpt2-small__res_sce-ajt/6-res_sce-ajt/cfg.json is not in the Hugging Face cache" in message
    assert main(["eval", "--sae", "gpt2-small-res_sce-ajt:blocks.6.hook_resid_pre"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastsae eval: error:" in err and "HF_HUB_OFFLINE is set" in err


# ------------------------------------------------------------------------------------------------
# fastsae releases

def test_releases_command_lists_and_filters(hub, capsys):
    assert main(["releases"]) == 0
    out = capsys.readouterr().out
    for name in ("test-saelens", "test-e2e-sae", "gpt2-small-res_sce-ajt", "eleuther-pythia-160m-res-32k"):
        assert name in out
    assert "none (gemma_2)" in out  # listed, with no converter
    assert main(["releases", "--model", "tiny-model"]) == 0
    out = capsys.readouterr().out
    assert "test-fastsae" in out and "test-sparsify" in out and "test-saelens" not in out
    assert main(["releases", "test-e2e-sae"]) == 0
    out = capsys.readouterr().out
    assert all(hook in out for hook in E2E_HOOKS) and "converter: e2e_sae" in out
    assert main(["releases", "nope"]) == 2


def test_trainer_saes_and_warnings_take_release_names(hub, monkeypatch):
    from fastsae.train import setup
    from fastsae.train.config import load_config

    config = load_config("embedded", ["saes.hooks=[blocks.1.hook_resid_pre]", "device=cpu"])
    lm = SimpleNamespace(d_model=D)  # build_saes reads the model's widths (an SAE's hook: d_model)
    saes = setup.build_saes(config, [HOOK], lm, setup.distributed.SINGLE, torch.device("cpu"),
                            {HOOK: f"test-saelens:{HOOK}"})
    assert_same_sae(saes[HOOK], E2ESAE.from_pretrained(hub[0]["test-saelens"][1]))
    registry = yaml.safe_load(Path(releases.registry_sources()[-1][1]).read_text())
    registry["test-saelens"]["config_overrides"] = {"model_from_pretrained_kwargs": {"center_writing_weights": True}}
    Path(releases.registry_sources()[-1][1]).write_text(yaml.safe_dump(registry))
    with pytest.warns(UserWarning, match="center_writing_weights.*fastsae runs models unprocessed"):
        E2ESAE.from_pretrained("test-saelens", sae_id=HOOK)


# ------------------------------------------------------------------------------------------------
# SAELens's registry (CI's second leg installs sae-lens)

def test_saelens_registry_is_read_as_saelens_reads_it():
    found = releases.saelens_registry()
    if found is None:
        pytest.skip("sae-lens is not installed (CI's second leg installs it)")
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    theirs = get_pretrained_saes_directory()
    ours = releases.load_registry([found])
    assert set(ours) == set(theirs)
    for name, lookup in theirs.items():
        release = ours[name]
        assert (release.repo_id, release.model, release.conversion_func) == (lookup.repo_id, lookup.model,
                                                                             lookup.conversion_func)
        assert {i: s.path for i, s in release.saes.items()} == lookup.saes_map
        assert {i: s.neuronpedia for i, s in release.saes.items()} == lookup.neuronpedia_id
    # fastsae's copies of releases SAELens also has agree with SAELens's entries
    shipped = releases.load_registry([("fastsae", releases.OWN_REGISTRY)])
    for name in set(shipped) & set(ours):
        a, b = shipped[name], ours[name]
        assert (a.repo_id, a.model, a.conversion_func) == (b.repo_id, b.model, b.conversion_func), name
        assert {i: (s.path, s.neuronpedia) for i, s in a.saes.items()} == \
               {i: (s.path, s.neuronpedia) for i, s in b.saes.items()}, name
    combined = releases.load_registry()
    assert combined["gpt2-small-res_sce-ajt"].source.startswith("sae-lens")  # SAELens's entry replaces ours
    assert "gemma-scope-2b-pt-res" in combined and combined["gemma-scope-2b-pt-res"].converter is None
    listing = releases.describe_releases(registry=combined)  # every entry lists, converter or not
    assert "gemma-scope-2b-pt-res " in listing and "none (gemma_2)" in listing and "SAELens's registry is not" not in listing


def test_analyze_and_dashboard_inputs_take_release_names(hub):
    from fastsae.analysis.stream import AnalysisError, load_targets

    inputs = load_targets([f"test-saelens:{HOOK}"])
    (target,) = inputs.targets
    assert target.hook == HOOK and target.label == f"test-saelens:{HOOK}" and inputs.config.model.name == "gpt2"
    assert_same_sae(target.sae, E2ESAE.from_pretrained(hub[0]["test-saelens"][1]))
    with pytest.raises(AnalysisError, match="nor a released SAE RELEASE:ID"):
        load_targets(["no-such-release:x"])
