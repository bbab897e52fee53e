"""Run under the real-vLLM venv's python: does vLLM's own CLI accept each planned argv?

Reads [{"name", "argv"}] as JSON on stdin; prints {name: "ok" | error} as JSON. For each argv it
strips the command prefix, parses the rest with vLLM's `vllm serve` parser, runs vLLM's own
pre-load checks, builds the engine arguments, builds the EC/KV transfer configs from our JSON, and
loads the connector classes they name. (Building the whole engine config would load the model's
config from the hub.)
"""

import json
import sys


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

        return getattr(importlib.import_module(module_path), name)
    if name not in factory._registry:
        raise ValueError(f"unknown connector {name!r}; vLLM has {sorted(factory._registry)}")
    return factory._registry[name]()


def check(argv: list[str]) -> str:
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
    try:
        validate_parsed_serve_args(args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        for flag, cls in (("--ec-transfer-config", ECTransferConfig), ("--kv-transfer-config", KVTransferConfig)):
            if flag in rest:
                config = cls(**json.loads(rest[rest.index(flag) + 1]))
                connector_class(config)
        if engine_args.model != args.model:
            return f"model {engine_args.model!r} is not the planned {args.model!r}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def main() -> int:
    import contextlib
    import io

    items = json.load(sys.stdin)
    results = {}
    for item in items:
        # vLLM prints help and warnings on failure; keep stdout for our JSON only.
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            result = check(item["argv"])
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        if result != "ok" and lines:
            result += f": {lines[-1]}"
        results[item["name"]] = result
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
