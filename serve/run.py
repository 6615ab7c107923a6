"""`klein serve`: a local Ray, the app deployed from a Serve config (as KubeRay would), the URL
printed, and a clean shutdown on Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import yaml

log = logging.getLogger(__name__)
CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIGS / "local-cpu.yaml"


SOURCES = ("model", "base_model", "weights", "transformer", "vae", "text_encoder")


def load_config(
    path: Path,
    *,
    preset=None,
    weights=None,
    host=None,
    port=None,
    random_weights=False,
    model=None,
    base_model=None,
):
    """The Serve config with the command line's overrides, validated by ServeDeploySchema."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(path.read_text())
    for app in raw.get("applications", []):
        args = app.setdefault("args", {})
        if weights is not None or model is not None:  # the command line's source replaces the config's
            for name in (*SOURCES, "preset"):
                args.pop(name, None)
        if weights is not None:
            args["weights"] = str(weights)
        if model is not None:
            args["model"] = str(model)
            if base_model is not None:
                args["base_model"] = base_model
        if preset is not None:
            args["preset"] = preset
        if random_weights:  # the command line asks for the preset's architecture, no checkpoint
            args["random_weights"] = True
            for name in SOURCES:
                args.pop(name, None)
    http = raw.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    unknown = _unknown_keys(raw)
    if unknown:
        raise ValueError(f"{unknown[0]} is not a Serve config key (Ray's schema would drop it unread)")
    return ServeDeploySchema.model_validate(raw)


def _unknown_keys(raw: dict) -> list[str]:
    """Keys of a Serve config that Ray's schemas do not know, where they would be dropped silently
    (a misspelt `max_ongoing_request` or `autoscaling_confg`), as paths: applications[0].x.y."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    def extra(d, schema, where: str) -> list[str]:
        known = set(schema.model_fields) | {f.alias for f in schema.model_fields.values() if f.alias}
        return [f"{where}{k}" for k in d if k not in known] if isinstance(d, dict) else []

    found = extra(raw, ServeDeploySchema, "") + extra(
        raw.get("http_options"), HTTPOptionsSchema, "http_options."
    )
    for i, app in enumerate(raw.get("applications") or []):
        found += extra(app, ServeApplicationSchema, f"applications[{i}].")
        for j, d in enumerate((app or {}).get("deployments") or []):
            where = f"applications[{i}].deployments[{j}]."
            found += extra(d, DeploymentSchema, where)
            found += extra(
                (d or {}).get("autoscaling_config"), AutoscalingConfig, where + "autoscaling_config."
            )
    return found


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fetched(settings, parser, flag: str) -> dict:
    """Resolve (for a hub id: download) the model here; the config then names it pinned to the
    commit that was fetched, so every replica loads the same files. Failures name the flag."""
    from klein.checkpoint import CheckpointError
    from klein.hub import HubError

    try:
        source = settings.model_source()
    except HubError as e:
        parser.error(f"{flag}: {e}")
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        parser.error(f"{flag}: {settings.model}: {e}")
    print(f"model {settings.model}: {source.spec.name}", flush=True)
    if not source.origin:  # a local path
        return {}
    return {"model": str(source.origin[0])} | (
        {"base_model": str(source.origin[1])} if len(source.origin) > 1 else {}
    )


def wait_running(app_name: str, timeout_s: float = 900) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"application {app_name!r} {status.status}: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"application {app_name!r} not running after {timeout_s:.0f} s")


def serve_forever(args, parser) -> int:
    config = _config(args, parser)
    for app in config.applications:
        _prepare(app, args, parser, host=config.http_options.host)
    return _run(config)


def _config(args, parser):
    """The Serve config the flags ask for; every bad flag is a message naming it."""
    path = args.config or DEFAULT_CONFIG
    if not path.is_file():
        parser.error(f"--config: {path} does not exist")
    if args.weights is not None and not args.weights.is_dir():
        parser.error(f"--weights: weights folder {args.weights} does not exist")
    if args.random_weights and (args.weights is not None or args.model):
        parser.error("--random-weights: give --preset, not --weights or --model")
    if args.model and args.weights is not None:
        parser.error("--model: give either --model or --weights, not both")
    if args.base_model and not args.model:
        parser.error("--base-model: only with --model")
    if args.port is not None and not 1 <= args.port <= 65535:
        parser.error(f"--port: must be between 1 and 65535, got {args.port}")
    try:
        config = load_config(
            path,
            preset=args.preset,
            weights=args.weights,
            host=args.host,
            port=args.port,
            random_weights=args.random_weights,
            model=args.model,
            base_model=args.base_model,
        )
    except Exception as e:
        parser.error(f"--config: {path} is not a valid Serve config: {e}")
    from serve.settings import unknown_variables

    for name in unknown_variables():
        parser.error(f"{name}: not a setting (misspelt?); see README.md's settings, or unset it")
    if not 1 <= config.http_options.port <= 65535:
        parser.error(
            f"--config: {path}: http_options.port must be between 1 and 65535, got {config.http_options.port}"
        )
    return config


def _settings_error(e: Exception, app) -> str:
    """A settings refusal, naming where the value came from: the KLEIN_* variable it was read from,
    or the config's field (never echoing the value: it may be a key)."""
    from pydantic import ValidationError

    if not isinstance(e, ValidationError) or not e.errors():
        return f"--config: application {app.name!r}: {e}"
    lines = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        if not loc:
            lines.append(f"--config: application {app.name!r}: {err['msg']}")
            continue
        variable = "KLEIN_" + "__".join(p.upper() for p in loc)
        from_env = variable in os.environ and not _in_config(app.args or {}, loc)  # args win over env
        where = variable if from_env else f"--config: application {app.name!r}: {'.'.join(loc)}"
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)


def _in_config(args: dict, loc: list[str]) -> bool:
    """Whether the config's args set the setting at `loc` (["ingress", "max_jobs_in_flight"])."""
    for part in loc:
        if not isinstance(args, dict) or part not in args:
            return False
        args = args[part]
    return True


def _prepare(app, args, parser, host: str) -> None:
    """Check one application's settings as its replicas will see them (config args over the
    environment), fetch its hub model once, and say where results go and whether keys guard it."""
    try:
        from serve.settings import Settings

        settings = Settings(**(app.args or {}))
        keyed = settings.key_ring().enabled
    except Exception as e:
        parser.error(_settings_error(e, app))
    if app.import_path == "serve.app:build":  # ours: a deployment named in the config must be one of its own
        from serve.app import DEPLOYMENTS

        for d in app.deployments:
            if d.name not in DEPLOYMENTS:
                parser.error(
                    f"--config: application {app.name!r}: no deployment {d.name!r}; "
                    f"its deployments are {', '.join(DEPLOYMENTS)}"
                )
    if settings.model:  # fetched here, once, before any replica starts (they find it cached)
        pinned = _fetched(settings, parser, "--model" if args.model else "--config")
        app.args = {**(app.args or {}), **pinned}
    else:  # local weights or a preset: found (or refused) here, not by each replica after Ray starts
        try:
            settings.model_source()
        except Exception as e:
            flag = (
                "--weights"
                if getattr(args, "weights", None)
                else "--preset"
                if getattr(args, "preset", None)
                else "--config"
            )
            parser.error(f"{flag}: {e}")
    if settings.storage.backend == "local":
        print(f"results of {app.name!r} are stored in {settings.storage.root.resolve()}", flush=True)
    if keyed:
        return
    if not _is_loopback(host):
        parser.error(
            f"--host: refusing to serve on {host} without API keys; set KLEIN_API_KEYS or KLEIN_API_KEYS_FILE "
            "(only loopback addresses may run without keys)"
        )
    log.warning("!" * 78)
    log.warning("NO API KEYS: every request is accepted. Fine on %s (loopback) only.", host)
    log.warning("Set KLEIN_API_KEYS or KLEIN_API_KEYS_FILE before exposing this service.")
    log.warning("!" * 78)


def _run(config) -> int:
    """A local Ray, the applications deployed as `serve run config.yaml` would, until a signal."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Replicas inherit this: idle OpenMP threads sleep instead of spinning. With several torch
    # processes on one machine, spinning threads burn the cores the other stages need (measured:
    # 5.6 -> 13.6 requests/s for the tiny DAG on 2 cores; benchmarks/serve_throughput.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api  # the path `serve run config.yaml` takes

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)
    # A signal handler runs between two bytecodes of the main thread, possibly inside a lock it holds:
    # it must take none (a threading.Event's would deadlock a second Ctrl-C arriving during the first's
    # Event.set). Appending to a list is atomic and lock-free.
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    try:
        client = serve_api.serve_start(
            http_options=config.http_options.model_dump(), proxy_location=config.proxy_location
        )
        client.deploy_apps(config, _blocking=False)
        for app in config.applications:
            wait_running(app.name)
        http = config.http_options
        host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
        print(
            f"klein-serve is up: http://{host}:{http.port}/ (the playground; API docs at /docs); Ctrl-C to stop",
            flush=True,
        )
        while not stopping:
            time.sleep(0.2)
        print("shutting down", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as e:
        log.error("%s", e)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()
