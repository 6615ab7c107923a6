"""Models by hub id through the real huggingface_hub client, against a loopback stand-in for the hub
(tests/hubserver.py) serving the tiny random weights in the official layouts: a first download
(only the files a model needs), a second run from the cache, a revision, offline with and without
the cache, a repository without a transformer, a gated repository without and with a token, an FP8
repository with its base, and the CLI's `--model` end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from klein import ModelSource
from klein.hub import HubError, HubId, parse_hub_id
from tests.hubserver import HubServer

REPO = "black-forest-labs/FLUX.2-klein-tiny"


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_dir):
    """The stand-in hub with the tiny model (a decoy BFL single file at its root, as the official
    repositories have), the client pointed at it with an empty cache."""
    from huggingface_hub import constants

    repo = tmp_path / "repo"
    shutil.copytree(tiny_dir, repo)
    (repo / "flux-2-klein-tiny.safetensors").write_bytes(b"the BFL single file: not needed")
    (repo / "README.md").write_text("model card")
    with HubServer() as server:
        server.sha = server.add_repo(REPO, repo)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        server.repo = repo
        yield server


def test_hub_ids_and_paths():
    assert parse_hub_id("black-forest-labs/FLUX.2-klein-4B") == HubId("black-forest-labs/FLUX.2-klein-4B")
    assert parse_hub_id("org/name@v1.0") == HubId("org/name", "v1.0")
    assert parse_hub_id("org/name/extra") is None and parse_hub_id("name") is None
    assert parse_hub_id(str(Path(__file__).parent)) is None  # an existing path is a path


def test_first_download_then_the_cache_then_offline(hub, tiny_dir, monkeypatch):
    from huggingface_hub import constants

    source = ModelSource.from_hub(REPO)
    fetched = {p.split(f"/resolve/{hub.sha}/")[-1] for p in hub.downloads}
    assert "flux-2-klein-tiny.safetensors" not in fetched and "README.md" not in fetched  # only what it needs
    assert {f.split("/")[0] for f in fetched} == {
        "model_index.json",
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
    }
    assert (
        source.origin == (HubId(REPO, hub.sha),)
        and Path(constants.HF_HUB_CACHE) in source.transformer.files[0].parents
    )
    local = ModelSource.from_paths(tiny_dir)
    assert (source.spec.transformer, source.spec.vae, source.spec.text) == (
        local.spec.transformer,
        local.spec.vae,
        local.spec.text,
    )
    downloads = len(hub.downloads)
    again = ModelSource.from_hub(REPO)  # from the cache: nothing downloaded
    assert len(hub.downloads) == downloads and again.transformer == source.transformer

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.stop()  # no network at all
    assert ModelSource.from_hub(REPO).transformer == source.transformer
    with pytest.raises(HubError, match=r"not in the cache .* HF_HUB_OFFLINE=1"):
        ModelSource.from_hub("black-forest-labs/FLUX.2-klein-other")


def test_a_revision_a_missing_transformer_and_unknown_names(hub, tmp_path):
    v2 = tmp_path / "v2"
    shutil.copytree(hub.repo, v2)
    (v2 / "model_index.json").write_text(
        (v2 / "model_index.json").read_text().replace('"is_distilled": true', '"is_distilled": false')
    )
    sha2 = hub.add_repo(REPO, v2, revision="v2")
    base = ModelSource.from_hub(f"{REPO}@v2")
    assert base.spec.sampling.cfg and base.origin == (HubId(REPO, sha2),)  # v2 says Base
    assert not ModelSource.from_hub(REPO).spec.sampling.cfg  # main is still distilled

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model_index.json").write_text("{}")
    hub.add_repo("org/no-transformer", empty)
    with pytest.raises(HubError, match="org/no-transformer has no transformer/"):
        ModelSource.from_hub("org/no-transformer")
    with pytest.raises(HubError, match="no such repository"):
        ModelSource.from_hub("org/nothing-here")
    with pytest.raises(HubError, match="revision 'v9' does not exist"):
        ModelSource.from_hub(f"{REPO}@v9")
    with pytest.raises(HubError, match="neither an existing path nor a hub id"):
        ModelSource.from_name("not a model")


def test_gated_needs_a_token(hub, monkeypatch):
    hub.add_repo("org/gated", hub.repo, gated=True)
    with pytest.raises(HubError, match=r"gated: accept its license .*HF_TOKEN"):
        ModelSource.from_hub("org/gated")
    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert ModelSource.from_hub("org/gated").spec.transformer is not None


def test_fp8_repository_takes_its_text_encoder_and_vae_from_its_base(hub, tmp_path, tiny_bfl_dir):
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    shutil.copy(tiny_bfl_dir / "flux-2-klein-tiny-fp8.safetensors", fp8)
    hub.add_repo("org/klein-tiny-fp8", fp8)
    with pytest.raises(HubError, match="--base-model"):
        ModelSource.from_hub("org/klein-tiny-fp8")  # not an official pair: the base must be named
    before = set(hub.downloads)
    source = ModelSource.from_hub("org/klein-tiny-fp8", base=REPO)
    fetched = {p.split("/resolve/")[-1] for p in set(hub.downloads) - before}
    assert not any("/transformer/" in f for f in fetched)  # the base's own transformer is not fetched
    assert source.transformer.files[0].name == "flux-2-klein-tiny-fp8.safetensors"
    assert [o.repo for o in source.origin] == ["org/klein-tiny-fp8", REPO]


def test_a_replica_on_a_node_without_the_files_fetches_its_part_at_the_same_commit(hub, tmp_path):
    """A Codec replica on another node fetches the VAE alone; a text embedder its encoder and
    tokenizer; each at the commit the driver resolved; then they load."""
    source = ModelSource.from_hub(REPO)
    assert source.local("transformer") is source  # here: nothing to do
    (tmp_path / "cache").rename(tmp_path / "elsewhere")  # a node that has not got the files
    before = len(hub.downloads)
    here = source.local("vae")
    fetched = [p.split(f"/resolve/{hub.sha}/")[-1] for p in hub.downloads[before:]]
    assert fetched and all(f.startswith("vae/") for f in fetched)  # only the VAE
    assert here.vae.files[0].is_file() and f"snapshots/{hub.sha}/" in str(here.vae.files[0])
    assert not here.transformer.files[0].exists()  # not fetched for a Codec
    source.load_vae()
    source.load_text_embedder()  # fetches the encoder and the tokenizer, then loads
    assert (tmp_path / "cache").exists() and not here.transformer.files[0].exists()


@pytest.mark.slow  # two CLI processes
def test_cli_generate_and_download_by_hub_id(hub, tmp_path):
    """`klein download` and `klein generate --model` in a subprocess (the environment as a user
    sets it); offline without the cache the CLI names the flag and the repository, no traceback."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    env.pop("HF_TOKEN", None)

    def klein(*args, **extra):
        return subprocess.run([sys.executable, "-m", "serve.cli", *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    r = klein("download", "--model", REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tiny" in r.stdout and str(tmp_path / "hf") in r.stdout
    out = tmp_path / "cat.png"
    r = klein("generate", "--model", REPO, "--prompt", "a cat", "--width", "64", "--height", "64", "--out", str(out),
              HF_HUB_OFFLINE="1")  # fmt: skip
    assert r.returncode == 0 and out.is_file(), r.stderr[-2000:]
    r = klein("generate", "--model", "org/not-cached", "--prompt", "x", "--out", str(out), HF_HUB_OFFLINE="1")
    assert r.returncode == 2 and "--model: model org/not-cached is not in the cache" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_klein_serve_by_hub_id_downloads_once(hub, tmp_path):
    """`klein serve --model org/name` fetches the model before the replicas start; the three stage
    replicas then load it from the cache: each file was downloaded once."""
    import httpx

    from tests.serving.conftest import start_klein_serve, stop_klein_serve, submit_and_wait

    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "KLEIN_STORAGE__ROOT": str(tmp_path / "data")}  # fmt: skip
    proc, url, lines = start_klein_serve(["--model", REPO], tmp_path, **env)
    try:
        assert any("klein-serve is up" in line for line in lines), "".join(lines[-30:])
        c = httpx.Client(base_url=url, timeout=60)
        model = c.get("/v1/models").json()["data"][0]["id"]
        res = submit_and_wait(c, model, {"prompt": "hello", "width": 64, "height": 64})
        assert res["status"] == "Ready", res
        files = list(hub.downloads)
        assert len(files) == len(set(files)), "a file was downloaded twice"
    finally:
        stop_klein_serve(proc)


def test_lora_adapters_from_the_hub(hub, tmp_path, monkeypatch):
    """With URLs allowed, loras[].path may name org/name/file.safetensors on the hub (or
    hf://...): size-capped before download, kept in storage by digest; bad ones say why."""
    import asyncio

    from deployments.stages.adapters import AdapterError, Adapters, LoraSettings
    from deployments.storage import StorageOptions
    from tests.klein.test_lora import _factors, write

    loras = tmp_path / "loras"
    (loras / "styles").mkdir(parents=True)
    write(loras / "styles" / "ink.safetensors", "ai-toolkit", _factors(1))
    (loras / "big.safetensors").write_bytes(b"\0" * (2 * 2**20))
    hub.add_repo("someone/klein-loras", loras)
    hub.add_repo("someone/gated-loras", loras, gated=True)
    spec = ModelSource.preset("tiny").spec
    storage = StorageOptions(root=tmp_path / "data")

    async def go():
        adapters = Adapters(LoraSettings(allow_urls=True, max_mb=1), storage, spec.transformer)
        key = await adapters.resolve("someone/klein-loras/styles/ink.safetensors")
        assert key.startswith("storage:loras/url/") and (await adapters.load(key)).factors
        assert await adapters.resolve("hf://someone/klein-loras/styles/ink.safetensors") == key
        for path, reason in [
            ("someone/klein-loras/big.safetensors", "over the 1 MB cap"),
            ("someone/klein-loras/nothing.safetensors", "no such file"),
            ("someone/gated-loras/styles/ink.safetensors", "gated"),
            ("someone/klein-loras/../x.safetensors", "a hub file is"),
            ("someone/a--b/x.safetensors", "a hub file is"),  # not a valid repository id
        ]:
            with pytest.raises(AdapterError, match=reason):
                await adapters.resolve(path if path.startswith("hf://") else "hf://" + path)
        closed = Adapters(LoraSettings(root=str(loras)), storage, spec.transformer)  # URLs off
        with pytest.raises(AdapterError, match="allow_urls is off"):
            await closed.resolve("hf://someone/klein-loras/styles/ink.safetensors")
        with pytest.raises(AdapterError, match="no adapter named"):  # a registry name, not the hub
            await closed.resolve("someone/klein-loras/styles/ink.safetensors")
        both = Adapters(LoraSettings(root=str(loras), allow_urls=True), storage, spec.transformer)
        with pytest.raises(AdapterError, match="no adapter named"):  # with a registry, hub files need hf://
            await both.resolve("someone/klein-loras/styles/ink.safetensors")
        assert (await both.resolve("hf://someone/klein-loras/styles/ink.safetensors")) == key

    asyncio.run(go())
