"""Serve config files and settings: validated offline, names match the app."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.app import DEPLOYMENTS
from serve.settings import Settings

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "serve" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_config_is_valid(path):
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = config.applications
    assert app.import_path == "serve.app:build"
    assert {d.name for d in app.deployments} == set(DEPLOYMENTS)
    for d in app.deployments:
        assert d.max_ongoing_requests and d.max_queued_requests and d.ray_actor_options
        assert d.num_replicas or d.autoscaling_config
    settings = Settings(**app.args)  # args parse into the typed settings (weights are not loaded)
    if "gpu" in path.name:
        assert settings.storage.backend == "s3" and settings.preset.startswith("klein-")
        gpus = {d.name: d.ray_actor_options.num_gpus or 0 for d in app.deployments}
        assert gpus["FlowTransformer"] > 0 and gpus["Ingress"] == 0
        assert settings.safety.require_classifier and settings.safety.classifier is not None
        assert settings.require_api_keys
        fast = settings.transformer_stage.fast
        assert fast.compile and fast.quantize == "fp8" and "1024x1024" in fast.warmup_sizes
        assert settings.text_embedder.fast.compile and settings.codec.fast.compile


def test_fast_path_options_are_checked_by_name():
    with pytest.raises(ValueError, match="warmup_sizes: '1000x1024' is not WxH with multiples of 16"):
        Settings(transformer_stage={"fast": {"warmup_sizes": ["1000x1024"]}})
    with pytest.raises(ValueError, match="each side must be between 64 and 2048"):
        Settings(transformer_stage={"fast": {"warmup_sizes": ["4096x1024"]}})
    with pytest.raises(ValueError, match="warmup_batch_sizes"):
        Settings(codec={"fast": {"warmup_batch_sizes": [0]}})
    with pytest.raises(ValueError, match="quantize"):
        Settings(transformer_stage={"fast": {"quantize": "int4"}})
    fast = Settings(transformer_stage={"fast": {"compile": True, "warmup_sizes": ["1024x768"]}})
    assert fast.transformer_stage.fast.fast_path().warmup_sizes == ((1024, 768),)


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KLEIN_STORAGE__BACKEND", "s3")
    monkeypatch.setenv("KLEIN_STORAGE__BUCKET", "images")
    monkeypatch.setenv("KLEIN_TRANSFORMER_STAGE__MAX_BATCH_TOKENS", "8192")
    monkeypatch.setenv("KLEIN_INGRESS__JOB_LEASE_S", "30")
    monkeypatch.setenv("KLEIN_TRANSFORMER_STAGE__FAST__COMPILE", "true")
    s = Settings()
    assert s.transformer_stage.fast.compile and not s.codec.fast.compile
    assert (s.storage.backend, s.storage.bucket) == ("s3", "images")
    assert s.transformer_stage.max_batch_tokens == 8192 and s.ingress.job_lease_s == 30
    assert s.preset == "tiny"  # no weights: the embedded default
    with pytest.raises(ValueError):
        Settings(storage={"backend": "ftp"})
    with pytest.raises(ValueError):
        Settings(not_a_setting=1)
    assert s.model_source().spec.name == "tiny"


def test_random_weights_serves_a_real_preset_without_a_checkpoint(tmp_path):
    from serve.run import load_config

    with pytest.raises(ValueError, match="needs weights"):
        Settings(preset="klein-4b").model_source()
    source = Settings(preset="klein-4b", random_weights=True).model_source()
    assert source.spec.name == "klein-4b" and source.spec.random_seed is not None
    with pytest.raises(ValueError, match="random_weights"):
        Settings(preset="klein-4b", random_weights=True, weights=tmp_path)
    config = load_config(CONFIGS[0], preset="klein-4b", random_weights=True)
    (app,) = config.applications
    assert Settings(**app.args).model_source().spec.name == "klein-4b"


def test_contradictory_safety_and_provenance_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="safety.classifier: required"):
        Settings(safety={"require_classifier": True})
    with pytest.raises(ValueError, match="c2pa_cert_chain and c2pa_key"):
        Settings(provenance={"c2pa_key": str(tmp_path / "key.pem")})
    with pytest.raises(ValueError, match="c2pa_cert_chain and c2pa_key"):
        Settings(provenance={"c2pa_cert_chain": str(tmp_path / "chain.pem")})


def test_each_setting_has_one_name(monkeypatch, tmp_path):
    """One level per field: the C2PA paths and the webhook switch live in their sections, and the
    environment names them there; a half-configured section fails when parsed, naming the fields."""
    monkeypatch.setenv("KLEIN_PROVENANCE__C2PA_KEY", str(tmp_path / "key.pem"))
    with pytest.raises(ValueError, match="c2pa_cert_chain and c2pa_key"):
        Settings()
    monkeypatch.setenv("KLEIN_PROVENANCE__C2PA_CERT_CHAIN", str(tmp_path / "chain.pem"))
    monkeypatch.setenv("KLEIN_INGRESS__WEBHOOK_ALLOW_PRIVATE", "true")
    s = Settings()
    assert s.provenance.c2pa_key == tmp_path / "key.pem" and s.ingress.webhook_allow_private
    for old in ("c2pa_key", "c2pa_cert_chain", "webhook_allow_private"):
        with pytest.raises(ValueError, match=old):
            Settings(**{old: "x"})


def test_klein_serve_refuses_a_contradictory_config_before_deploying(tmp_path, capsys):
    from serve.cli import main

    config = yaml.safe_load(CONFIGS[-1].read_text())  # local-cpu.yaml
    config["applications"][0]["args"]["safety"] = {"require_classifier": True}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as e:
        main(["serve", "--config", str(path)])
    assert e.value.code == 2
    assert "safety.classifier: required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "section",
    [
        {"ingress": {"max_job_in_flight": 5}},
        {"storage": {"bucket_name": "x"}},
        {"transformer_stage": {"fast": {"compil": True}}},
        {"lora": {"slot": 3}},
        {"safety": {"classifer": "/x"}},
        {"codec": {"deployment": {"autoscaling": {"max_replica": 2}}}},
        {"prices": {"flux-2-klein-tiny": {"first_mp": 1, "per_mp": 1, "lora_mp": 1}}},
    ],
)
def test_a_misspelt_key_in_any_section_is_refused_by_name(section):
    """Every section of the settings knows its keys: a misspelling names itself instead of leaving
    the setting at its default without a word."""
    with pytest.raises(ValueError, match="Extra inputs are not permitted") as e:
        Settings(**section)
    path = []
    value = section
    while isinstance(value, dict) and len(value) == 1:
        (key, value), *_ = value.items()
        path.append(key)
    assert ".".join(path[-2:]) in str(e.value)


def test_compiler_options_need_compile_and_frozen_weights_refuse_lora(tmp_path):
    with pytest.raises(ValueError, match="freeze: a compiler option; it needs compile: true"):
        Settings(transformer_stage={"fast": {"freeze": True}})
    with pytest.raises(ValueError, match="autotune: a compiler option; it needs compile: true"):
        Settings(codec={"fast": {"autotune": True}})
    with pytest.raises(ValueError, match="autotune: inductor's option; it does nothing with backend 'eager'"):
        Settings(codec={"fast": {"compile": True, "autotune": True, "backend": "eager"}})
    frozen = {"fast": {"compile": True, "freeze": True, "autotune": True}}
    assert Settings(transformer_stage=frozen).transformer_stage.fast.fast_path().freeze
    with pytest.raises(ValueError, match="transformer_stage.fast.freeze with lora.enabled: freeze makes"):
        Settings(transformer_stage=frozen, lora={"root": str(tmp_path)})
    # the other stages hold no adapters: their weights may be frozen with LoRA on
    Settings(codec=frozen, text_embedder=frozen, lora={"root": str(tmp_path)})


def test_an_unknown_preset_is_refused_when_parsed():
    with pytest.raises(ValueError, match="unknown preset 'klein-7b'; choose one of"):
        Settings(preset="klein-7b")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(http_option={"port": 1}), "http_option is not a Serve config key"),
        (
            lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_request=3),
            "applications[0].deployments[0].max_ongoing_request is not a Serve config key",
        ),
        (
            lambda c: c["applications"][0]["deployments"][1].update(autoscaling_confg={}),
            "applications[0].deployments[1].autoscaling_confg is not a Serve config key",
        ),
        (
            lambda c: c["applications"][0]["deployments"][1].update(name="FlowTransfomer"),
            "no deployment 'FlowTransfomer'; its deployments are Ingress",
        ),
        (lambda c: c["http_options"].update(port=70000), "http_options.port must be between 1 and 65535"),
        (lambda c: c["applications"][0]["args"].update(preset="klein-7b"), "unknown preset 'klein-7b'"),
    ],
)
def test_klein_serve_refuses_what_ray_would_drop_or_fail_on_later(
    tmp_path, capsys, monkeypatch, change, message
):
    """Ray's config schema drops keys it does not know; a wrong deployment name, a port out of
    range or an unknown preset fail only once Ray runs. klein serve says so first (exit 2)."""
    import serve.run
    from serve.cli import main

    def deployed(config):
        raise AssertionError("the config was deployed")

    monkeypatch.setattr(serve.run, "_run", deployed)  # a missed check fails here, without starting Ray

    config = yaml.safe_load(CONFIGS[-1].read_text())  # local-cpu.yaml
    change(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as e:
        main(["serve", "--config", str(path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_misspelt_environment_variable_is_named(tmp_path, capsys, monkeypatch):
    """KLEIN_* variables that set nothing are listed (the settings would ignore them without a word);
    klein serve refuses to start with one, naming it. The load generator's own variables are not
    settings and pass."""
    import serve.run
    from serve.cli import main
    from serve.settings import unknown_variables

    env = {
        "KLEIN_INGRES__MAX_JOBS_IN_FLIGHT": "3",
        "KLEIN_INGRESS__MAX_INFLIGHT_PER_KEY": "-1",
        "KLEIN_PRESETT": "tiny",
        "KLEIN_INGRESS__MAX_JOBS_IN_FLIGHT": "3",
        "KLEIN_TRANSFORMER_STAGE__FAST__COMPILE": "true",
        "KLEIN_PRICES": "{}",
        "KLEIN_SIZES": "64x64",
        "PATH": "/bin",
    }
    assert unknown_variables(env) == [
        "KLEIN_INGRESS__MAX_INFLIGHT_PER_KEY",
        "KLEIN_INGRES__MAX_JOBS_IN_FLIGHT",
        "KLEIN_PRESETT",
    ]
    monkeypatch.setattr(serve.run, "_run", lambda config: pytest.fail("deployed"))
    monkeypatch.setenv("KLEIN_INGRES__MAX_JOBS_IN_FLIGHT", "3")
    with pytest.raises(SystemExit) as e:
        main(["serve"])
    assert e.value.code == 2
    assert "KLEIN_INGRES__MAX_JOBS_IN_FLIGHT: not a setting" in capsys.readouterr().err
