"""Run under the real-vLLM venv's python: does vLLM's own CLI accept each planned argv?

Reads [{"name", "argv", "env"?}] as JSON on stdin; prints {name: "ok" | error} as JSON. For each argv it
strips the command prefix, parses the rest with vLLM's `vllm serve` parser, runs vLLM's own
pre-load checks, builds the engine arguments, builds the EC/KV transfer configs from our JSON, and
loads the connector classes they name; for ECCPUConnector and ECMooncakeConnector it also runs their
start-up checks against the planned env. (Building the whole engine config would load the model's
config from the hub.)
"""

import json
import sys


class PluginMissing(Exception):
    """The connector lives in an out-of-tree plugin (vllm-ascend's `vllm_ascend`) that this venv lacks:
    everything up to loading its class was checked; the class itself cannot be."""


def connector_class(config) -> type:
    """The connector class vLLM would instantiate for this EC/KV transfer config (a typo'd name
    fails here, where the config classes alone accept any string)."""
    from vllm.config import ECTransferConfig
    from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if isinstance(config, ECTransferConfig):
        factory, name, module_path = ECConnectorFactory, config.ec_connector, config.ec_connector_module_path
    else:
        factory, name, module_path = KVConnectorFactory, config.kv_connector, config.kv_connector_module_path
    if module_path:
        import importlib

        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as exc:
            if exc.name == module_path.split(".")[0]:
                raise PluginMissing(exc.name) from None
            raise
        return getattr(module, name)
    if name not in factory._registry:
        raise ValueError(f"unknown connector {name!r}; vLLM has {sorted(factory._registry)}")
    return factory._registry[name]()


def check_ec_connector(config, engine_args, env: dict) -> None:
    """What ECCPUConnector and ECMooncakeConnector check when they start, run with vLLM's own code
    where it is pure (Mooncake's config; the environment through vllm.envs's own parsers)."""
    import os
    from types import SimpleNamespace as NS

    from vllm import envs

    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        use_v2 = bool(envs.VLLM_USE_V2_MODEL_RUNNER)
        if config.ec_connector == "ECCPUConnector":
            if not use_v2:  # ECCPUConnector.__init__'s own check and message
                raise ValueError("ECCPUConnector requires the V2 model runner. Set VLLM_USE_V2_MODEL_RUNNER=1.")
            cpu_bytes = config.ec_connector_extra_config.get("ec_cpu_bytes")
            if not cpu_bytes:  # as create_ec_shared_region reads it
                raise ValueError("ec_cpu_bytes must be specified in ec_connector_extra_config")
            int(cpu_bytes)
            if config.is_ec_producer and (not 1 <= envs.VLLM_EC_SIDE_CHANNEL_PORT <= 65535
                                          or envs.VLLM_EC_SIDE_CHANNEL_HOST in ("", "localhost")):
                raise ValueError(f"side channel {envs.VLLM_EC_SIDE_CHANNEL_HOST}:{envs.VLLM_EC_SIDE_CHANNEL_PORT} "
                                 "is vLLM's default or unusable")
        elif config.ec_connector == "ECMooncakeConnector":
            from vllm.distributed.ec_transfer.ec_connector.mooncake.config import MooncakeECConfig

            vllm_config = NS(
                parallel_config=NS(tensor_parallel_size=engine_args.tensor_parallel_size,
                                   pipeline_parallel_size=engine_args.pipeline_parallel_size,
                                   data_parallel_size=engine_args.data_parallel_size, data_parallel_index=0),
                ec_transfer_config=config, use_v2_model_runner=use_v2,
                lora_config=object() if engine_args.enable_lora else None,
                model_config=NS(multimodal_config=NS(mm_processor_cache_gb=engine_args.mm_processor_cache_gb)))
            MooncakeECConfig.from_vllm_config(vllm_config)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check(argv: list[str], env: dict | None = None) -> str:
    from vllm.config import ECTransferConfig, KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if "serve" in argv:
        rest = argv[argv.index("serve") + 1:]
    elif "vllm.entrypoints.openai.api_server" in argv:
        rest = argv[argv.index("vllm.entrypoints.openai.api_server") + 1:]
    else:
        return f"unknown entry point in {argv[:3]}"
    parser = make_arg_parser(FlexibleArgumentParser(exit_on_error=False))
    try:
        args = parser.parse_args(rest)
    except SystemExit as exc:
        return f"the parser exited ({exc.code})"
    except Exception as exc:  # argparse.ArgumentError and friends
        return f"{type(exc).__name__}: {exc}"
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    missing = None
    try:
        validate_parsed_serve_args(args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        for flag, cls in (("--ec-transfer-config", ECTransferConfig), ("--kv-transfer-config", KVTransferConfig)):
            if flag in rest:
                config = cls(**json.loads(rest[rest.index(flag) + 1]))
                try:
                    connector_class(config)
                except PluginMissing as exc:
                    missing = str(exc)
                if cls is ECTransferConfig:
                    check_ec_connector(config, engine_args, env or {})
        if engine_args.model != args.model:
            return f"model {engine_args.model!r} is not the planned {args.model!r}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"ok without the plugin {missing}" if missing else "ok"


def main() -> int:
    import contextlib
    import io

    items = json.load(sys.stdin)
    results = {}
    for item in items:
        # vLLM prints help and warnings on failure; keep stdout for our JSON only.
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            result = check(item["argv"], item.get("env"))
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        if result != "ok" and lines:
            result += f": {lines[-1]}"
        results[item["name"]] = result
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
