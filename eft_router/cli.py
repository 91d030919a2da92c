"""The ``eft`` command line.

  eft serve --local                        # a private Ray on this machine, every role deployed, the router
  eft serve --config ensemble.yaml --deploy --address auto   # deploy onto a running cluster, then route
  eft serve --in-process                   # every role in the router's process (no Ray)
  eft generate "question"                  # against the router at $EFT_TARGET or localhost:50051
  eft generate --json -k 4 --temperature 0 "question"
  eft score --prompt "question" "answer"   # per-token log-probs under EFT and each role
  eft models                               # roles, models, vocabulary, defaults, limits
  eft demo [--tiny]                        # what `make demo` runs
  eft family build [--force]               # train the embedded family (cached)
  eft eval [--out DIR]                     # the paper's experiments on it: JSON, Markdown, PNG
  eft tiny-family DIR                      # random tiny roles, for trying things

``generate``, ``score`` and ``models`` are gRPC clients. With ``--model ROLE=PATH`` (repeated)
they start a router in this process on those models instead, for one command;
``--adapter ROLE=BASE:PATH`` adds a LoRA adapter role co-served with role BASE.

``serve`` and ``demo`` compose the router with the Ray Serve deployments of ``services``;
they load ``services.launch`` by name, as Serve loads deployments: the library modules of
``eft_router`` never import ``services``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from .core.spec import PRESETS
from .roles.serve import use_serve_env
from .server.client import EFTClient
from .server.messages import finish_reason_name


def _pairs(items: list[str], what: str, cast=str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what}: expected NAME=VALUE, got {item!r}")
        out[key] = cast(value)
    return out


def _launch() -> Any:
    return importlib.import_module("services.launch")


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="router address (default: $EFT_TARGET or localhost:50051)")
    p.add_argument("--token", default=None, help="bearer token (default: $EFT_AUTH_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="CA of the server's certificate: use TLS (default: $EFT_TLS_CA)")
    p.add_argument("--client-cert", default=None, help="client certificate (servers that require one)")
    p.add_argument("--client-key", default=None)
    p.add_argument("--timeout", type=float, default=None, help="deadline per call, seconds")
    p.add_argument("--model", action="append", default=[], metavar="ROLE=PATH", help="run on these models in-process instead (repeat per role)")
    p.add_argument("--adapter", action="append", default=[], metavar="ROLE=BASE:PATH", help="with --model: a LoRA adapter role on role BASE's model")


def _eft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="", choices=["", *PRESETS], help="default: the server's")
    p.add_argument("--delta", action="append", default=[], metavar="ROLE=LAMBDA", help="a fine-tuned delta and its lambda; repeatable")
    p.add_argument("--coef", action="append", default=[], metavar="ROLE=C", help="a coefficient for preset 'linear'; repeatable")
    p.add_argument("--beta", type=float, default=None, help="up-scaling amplification")
    p.add_argument("--weight-top-p", type=float, default=None, help="top-p filter of the up-scaling weights")


def _eft(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        preset=args.preset,
        deltas=_pairs(args.delta, "--delta", float),
        beta=args.beta,
        weight_top_p=args.weight_top_p,
        coefficients=_pairs(args.coef, "--coef", float),
    )


def _client(args: argparse.Namespace, stack: ExitStack) -> EFTClient:
    """A client of the router named by the arguments, or of one started here on ``--model``s."""
    target = args.target
    if args.adapter and not args.model:
        raise SystemExit("--adapter: needs --model (the adapters' base roles run in this process)")
    if args.model:
        from .roles.adapters import Adapter
        from .roles.local import load_local_roles
        from .server.config import RouterConfig
        from .server.grpc_server import Router, RouterThread

        models = _pairs(args.model, "--model")
        adapters = {}
        for role, spec in _pairs(args.adapter, "--adapter").items():
            base, sep, path = spec.partition(":")
            if not sep or not base or not path:
                raise SystemExit(f"--adapter: expected ROLE=BASE:PATH, got {role}={spec}")
            adapters[role] = Adapter(path, base)

        async def make() -> Router:
            return Router(*load_local_roles(models, adapters=adapters), RouterConfig(port=0), owns_roles=True)

        router = stack.enter_context(RouterThread(make))
        target = f"localhost:{router.port}"
    return stack.enter_context(
        EFTClient(target, token=args.token, root_cert=args.tls_ca, client_cert=args.client_cert, client_key=args.client_key, timeout=args.timeout)
    )


def _prompt(client: EFTClient, args: argparse.Namespace, text: str):
    """Text as a user's chat message when the server has a chat template (or ``--chat``)."""
    chat = args.chat if args.chat is not None else client.info().chat_template
    return [{"role": "user", "content": text}] if chat else text


def _as_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _generate(args: argparse.Namespace, stack: ExitStack) -> None:
    client = _client(args, stack)
    params = dict(
        _eft(args), temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        max_tokens=args.max_tokens, stop=args.stop, k=args.k, draft_confidence=args.draft_confidence,
        adaptive=args.adaptive or None, overlap=args.overlap or None, tree_width=args.tree_width, diagnostics=args.json,
    )
    prompt = _prompt(client, args, args.prompt)
    if args.json:
        reply = client.generate(prompt, **params)
        out = _as_dict(reply)
        out["finish_reason"] = finish_reason_name(reply.finish_reason)
        print(json.dumps(out, indent=2))
        return
    for chunk in client.stream(prompt, **params):
        print(chunk.text, end="", flush=True)
        if chunk.finish_reason:
            s = chunk.stats
            print(f"\n[{finish_reason_name(chunk.finish_reason)}] {chunk.usage.completion_tokens} tokens in {s.blocks} blocks, "
                  f"acceptance {s.acceptance_rate:.2f}, seed {s.seed}", file=sys.stderr)


def _score(args: argparse.Namespace, stack: ExitStack) -> None:
    client = _client(args, stack)
    reply = client.score(_prompt(client, args, args.prompt), args.continuation, **_eft(args))
    print(json.dumps(_as_dict(reply), indent=2))


def _models(args: argparse.Namespace, stack: ExitStack) -> None:
    print(json.dumps(_as_dict(_client(args, stack).info()), indent=2))


def _serve(args: argparse.Namespace) -> None:
    launch = _launch()
    config = _ensemble(args, launch)
    updates = {k: v for k, v in (("host", args.host), ("port", args.port), ("http_port", args.http_port)) if v is not None}
    config = config.model_copy(update={"router": config.router.model_copy(update=updates)})
    backend = "local" if args.in_process else config.router.backend
    launch.serve_forever(config, backend, None if args.local else args.address, deploy_roles=args.local or args.deploy)


def _ensemble(args: argparse.Namespace, launch: Any):
    """The ensemble config of ``--config``, or the embedded family (built if not cached)."""
    if args.config:
        from services.config import EnsembleConfig

        return EnsembleConfig.from_yaml(args.config)
    from .family.build import DEFAULT, build_family

    return launch.family_config(build_family(DEFAULT, quiet=args.quiet))


def _demo(args: argparse.Namespace) -> None:
    from .demo import DemoQuestion, family_questions

    launch = _launch()
    backend = "local" if args.in_process else None  # None: the config's router.backend
    if args.tiny:
        with tempfile.TemporaryDirectory(prefix="eft-demo-") as tmp:
            paths = _build_tiny(tmp)
            questions = [DemoQuestion(p, p) for p in ("w1 w2 w3", "w10 w11", "w42 w7 w42")]
            launch.demo(launch.family_config(paths), questions, backend, max_tokens=args.max_tokens, k=args.k)
        return
    config = _ensemble(args, launch)
    launch.demo(config, family_questions(args.questions), backend, max_tokens=args.max_tokens, k=args.k)


def _build_tiny(directory: str) -> dict[str, str]:
    from .tiny import TinyModel, build_tiny_family

    roles = {
        "base_large": TinyModel(hidden=128, layers=4, seed=1, init_std=0.05),
        "base_small": TinyModel(hidden=32, layers=1, seed=2, init_std=0.05),
        "ft_small": TinyModel(hidden=32, layers=1, seed=3, init_std=0.3),
    }
    return build_tiny_family(directory, [f"w{i}" for i in range(100)], roles)


def _tiny_family(args: argparse.Namespace) -> None:
    for role, path in _build_tiny(args.dir).items():
        print(f"{role}={path}")


def _family(args: argparse.Namespace) -> None:
    from .family.build import DEFAULT, MINIATURE, adapter_paths, build_family, family_dir, read_manifest

    config = MINIATURE if args.miniature else DEFAULT
    paths = build_family(config, force=args.force, quiet=args.quiet)
    manifest = read_manifest(family_dir(config))
    for role, path in paths.items():
        print(f"{role}={path}")
    for role, adapter in adapter_paths(family_dir(config)).items():
        print(f"{role}={adapter.path} (LoRA adapter of {adapter.base})")
    probes = manifest["probes"]
    print(
        f"family v{manifest['version']} ({manifest['digest']}), built in {manifest['seconds']} s; "
        f"held-out fact accuracy base_small {probes['base_small_fact_accuracy']:.2f}, base_large "
        f"{probes['base_large_fact_accuracy']:.2f} ({probes['fact_probes']} probes); decode step base_small "
        f"{probes['base_small_step_ms']:.2f} ms, base_large {probes['base_large_step_ms']:.2f} ms ({probes['step_ratio']}x)",
        file=sys.stderr,
    )


def _eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .family.build import DEFAULT, MINIATURE, adapter_paths, build_family, family_dir
    from .family.evaluate import MINI_EVAL, EvalConfig, run_eval

    config = MINIATURE if args.miniature else DEFAULT
    paths = build_family(config, quiet=args.quiet)
    cfg = replace(MINI_EVAL if args.miniature else EvalConfig(), seed=args.seed)
    if args.prompts is not None:
        cfg = replace(cfg, n_per_category=args.prompts)
    run_eval(paths, Path(args.out), cfg, world_seed=config.seed, n_entities=config.n_entities, quiet=args.quiet,
             adapters=adapter_paths(family_dir(config)))
    print(f"report: {Path(args.out) / 'report.md'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eft", description="Emulated fine-tuning (EFT) as a served model ensemble")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="sample from the EFT distribution (streams text)")
    _client_args(gen)
    _eft_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="a stop string; repeatable")
    gen.add_argument("-k", "--speculative-k", dest="k", type=int, default=None, help="draft block size (0: off)")
    gen.add_argument("--draft-confidence", type=float, default=None, help="end drafting before a token the drafter is less sure of (0: off)")
    gen.add_argument("--adaptive", action="store_true", help="adapt the block size to acceptance, k at most")
    gen.add_argument("--overlap", action="store_true", help="draft the next block while this one is verified")
    gen.add_argument("--tree-width", type=int, default=None, help="branch into this many tokens where the drafter is unsure (needs --draft-confidence)")
    gen.add_argument("--json", action="store_true", help="one JSON object with statistics and diagnostics")

    score = sub.add_parser("score", help="per-token log-probs of a continuation")
    _client_args(score)
    _eft_args(score)
    score.add_argument("--prompt", required=True)
    score.add_argument("continuation")

    models = sub.add_parser("models", help="the served roles, vocabulary, defaults and limits")
    _client_args(models)
    for p in (gen, score):
        p.add_argument("--chat", dest="chat", action="store_true", default=None, help="send the prompt as a user's chat message")
        p.add_argument("--raw", dest="chat", action="store_false", help="send the prompt as plain text (default: chat when the server has a chat template)")

    srv = sub.add_parser("serve", help="run the router, gRPC and OpenAI-compatible HTTP (and the ensemble)")
    demo = sub.add_parser("demo", help="start everything, show EFT and speculative decoding through gRPC and HTTP, stop")
    for p in (srv, demo):
        p.add_argument("--config", default=None, help="ensemble config YAML (default: the embedded family)")
        p.add_argument("--in-process", action="store_true", help="every role in the router's process, no Ray")
        p.add_argument("--quiet", action="store_true", help="no progress bars while building the family")
    srv.add_argument("--local", action="store_true", help="start a private Ray on this machine and deploy every role")
    srv.add_argument("--deploy", action="store_true", help="deploy the config's roles onto the joined cluster first")
    srv.add_argument("--address", default="auto", help="Ray cluster to join (default: auto)")
    srv.add_argument("--host", default=None, help="listen address (default: the config's router.host)")
    srv.add_argument("--port", type=int, default=None, help="gRPC port (default: the config's router.port, 50051)")
    srv.add_argument("--http-port", type=int, default=None, help="OpenAI-compatible HTTP port, 0 turns it off (default: the config's router.http_port, 8080)")
    demo.add_argument("--tiny", action="store_true", help="random tiny models instead of the embedded family (seconds)")
    demo.add_argument("--questions", type=int, default=6)
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.add_argument("-k", type=int, default=4, help="draft block size of the speculative run")

    tiny = sub.add_parser("tiny-family", help="build random tiny role models (for trying the engine)")
    tiny.add_argument("dir")

    fam = sub.add_parser("family", help="the embedded model family")
    fam_sub = fam.add_subparsers(dest="family_command", required=True)
    build = fam_sub.add_parser("build", help="train it if it is not cached; print role=path lines")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    for p in (build, ev := sub.add_parser("eval", help="run the EFT experiments on the family")):
        p.add_argument("--miniature", action="store_true", help="toy sizes, seconds (for tests)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--out", default="eval-report", help="output folder (results.json, report.md, PNGs)")
    ev.add_argument("--prompts", type=int, default=None, help="prompts per category, fact and harmful (default 50)")
    ev.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command in ("serve", "demo"):
        use_serve_env()  # before Ray and Serve start in this process (and the Ray it may start)
    commands = {"tiny-family": _tiny_family, "family": _family, "eval": _eval, "serve": _serve, "demo": _demo}
    clients = {"generate": _generate, "score": _score, "models": _models}
    try:
        if args.command in clients:
            with ExitStack() as stack:
                clients[args.command](args, stack)
        else:
            commands[args.command](args)
    except grpc.RpcError as e:
        raise SystemExit(f"error: {e.code().name}: {e.details()}") from None
    except ValueError as e:  # SpecError, config validation
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
