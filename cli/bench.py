"""``dynamo bench``: load-benchmark any OpenAI-compatible endpoint; ``dynamo bench compare A B``."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from dynamo.cli.helptext import reflow
from dynamo.core.errors import UsageError
from dynamo.core.signals import StopSignals, say
from dynamo.core.text import quantity

METRICS_HELP = """\
Metric definitions (times in ms; latency metrics use successful requests only):

TTFT: request sent -> first response chunk that carries a token (a role-only chunk is not a token).
ITL (per token): for each token-carrying chunk after the first, the gap since the previous one
  divided by the tokens it carried; one sample per token. Tokens per chunk come from the
  server's running usage (stream_options.continuous_usage_stats) when it sends it (usage);
  else one per chunk when the server's final count equals the number of chunks (chunks);
  else the --tokenizer, tokenizing each chunk's text (tokenizer); else one per chunk
  (chunks). The table's "Tokens per chunk from" line says which, for how many requests.
  Equal to vLLM's ITL when every chunk holds one token.
ICL (per chunk): raw gaps between consecutive token-carrying chunks (vLLM's "ITL").
TPOT: (last token time - first token time) / (output tokens - 1), per request
  (aiperf calls this "ITL"; the first token is excluded, unlike guidellm's TPOT).
E2EL: request sent -> last byte of the response.
Output tok/s per user: (output tokens - 1) / (last token time - first token time) = 1000/TPOT.
Duration: first request sent -> last response finished (warmup excluded).
Request / output / total token throughput: successful requests, their output tokens, their
  input + output tokens, each divided by the duration.
Goodput: successful requests per second meeting every --goodput SLO (DistServe); the
  itl SLO applies to a request's largest per-token ITL.
Output tokens: the server's usage.completion_tokens when sent, else the client's count.
  Client counts retokenize the returned text with --tokenizer; both and their
  difference are reported. Client input counts cover the prompt text only; the server's
  include the chat template.
Schedule lag: actual send time - intended arrival time (rate and trace modes); a growing
  lag means the generator (or a --max-concurrency cap) is not keeping up.
Client loop lag: how late the benchmark's event loop wakes from a 5 ms sleep, sampled all
  along; every timestamp can be late by this much. A warning is printed when its p99
  exceeds 10 ms (the generator is near its limit).
Percentiles: p50/p90/p95/p99 with linear interpolation, plus mean, min and max; the standard
  deviation (std) too in --json, results.json and summary.csv (not in the table).
Errors: http_<status>, connect_error, disconnected, timeout, incomplete_stream, stream_error,
  bad_response, empty_output, cancelled, unexpected_<exception>; a failed request never
  stops the run."""


class _BenchGroup(TyperGroup):
    """Accepts vLLM-style space-separated lists: ``--goodput ttft:200 tpot:50``, ``--concurrency 1 2 4``."""

    LIST_OPTIONS = {
        "--goodput": re.compile(r"^[A-Za-z0-9_]+:[0-9.]+$"),
        "--concurrency": re.compile(r"^[0-9][0-9,]*$"),
        "-c": re.compile(r"^[0-9][0-9,]*$"),
        "--request-rate": re.compile(r"^([0-9.][0-9.,]*|inf)$", re.IGNORECASE),
    }

    def parse_args(self, ctx, args):
        out: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            out.append(arg)
            pattern = self.LIST_OPTIONS.get(arg)
            if pattern is not None and i + 1 < len(args):
                out.append(args[i + 1])
                i += 2
                while i < len(args) and pattern.match(args[i]):
                    out.extend([arg, args[i]])
                    i += 1
                continue
            i += 1
        return super().parse_args(ctx, out)


app = typer.Typer(
    cls=_BenchGroup,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _fail(message: str, code: int = 2) -> None:
    for line in message.splitlines() or [message]:
        typer.secho(f"error: {line}", fg="red", err=True)
    raise typer.Exit(code)


class _Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived before anything was measured."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals(StopSignals):
    """SIGINT, SIGTERM and SIGHUP while ``dynamo bench`` runs (a context manager).

    The first one stops the benchmark: while the load runs it cancels the event loop's main task
    (which cancels every request in flight; the runner keeps what was measured), anywhere else it
    raises :class:`_Interrupted`. Once the load is over (:meth:`loop_done`) signals only say to wait:
    cutting the saving of the results or ``dynamo stop`` short is what would lose them or leave the
    served run behind. SIGHUP means the terminal is gone: from then on what bench prints to it is
    dropped (the files under --output-dir are still written). A SIGHUP that was ignored when bench
    started (``nohup``) stays ignored.
    """

    def __init__(self) -> None:
        super().__init__()
        self.received: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._holding: str | None = None

    def on_signal(self, signum: int) -> None:
        if self._holding:
            say(f"{self._holding}: wait for it")
            return
        if self.received is not None:
            return
        self.received = signum
        if self._task is None:
            raise _Interrupted(signum)
        try:
            self._loop.call_soon_threadsafe(self._task.cancel)
        except RuntimeError:  # the loop has just closed: its result is being kept
            pass

    async def guard(self, coro):
        """Await ``coro`` as the task a signal cancels."""
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        return await coro

    def loop_done(self) -> None:
        """The event loop is over: what it measured is being saved, so signals now only say to wait."""
        self._task = None
        self.hold("still finishing (saving the results)")

    def hold(self, why: str) -> None:
        self._holding = why


def _split_list(values: Optional[List[str]], what: str, parse) -> list:
    """``["1,2", "4"]`` -> ``[1, 2, 4]``; an empty item (``1,,2``, a trailing comma) is an error, not skipped."""
    out = []
    for v in values or []:
        for part in v.split(","):
            items = part.split()
            if not items:
                raise UsageError(f"{what} {v!r}: an empty value (two commas in a row, or one at an end); "
                                 f"give a list like 1,2,4")
            for item in items:
                try:
                    out.append(parse(item))
                except ValueError:
                    raise UsageError(f"{what} {item!r} is not valid") from None
    return out


def _concurrency(item: str) -> int:
    n = int(item)
    if n < 1:
        raise ValueError
    return n


def _rate(item: str) -> float:
    r = float(item)
    if not r > 0 or math.isnan(r):
        raise ValueError
    return r


def _duration(value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    from dynamo.core.durations import parse_duration

    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"--duration: {exc}") from None
    if seconds <= 0:
        raise UsageError("--duration must be greater than 0")
    return seconds


P_TARGET, P_LOAD, P_WORK, P_OUT = "Target", "Load", "Workload", "Metrics and output"


@app.callback(invoke_without_command=True, epilog=reflow(METRICS_HELP))
def bench(
    ctx: typer.Context,
    url: Optional[str] = typer.Option(None, "--url", metavar="URL", help="Base URL of an OpenAI-compatible server "
                                      "(http://host:port or .../v1).", rich_help_panel=P_TARGET),
    profile: Optional[str] = typer.Option(None, "--profile", metavar="PROFILE", help="Serve this profile (dynamo serve --detach), "
                                          "benchmark it, then stop it.", rich_help_panel=P_TARGET),
    serve_args: Optional[List[str]] = typer.Option(None, "--serve-arg", metavar="ARG",
                                                   help="Extra argument for dynamo serve with --profile "
                                                   "(repeatable), e.g. --serve-arg=--backend=mocker.",
                                                   rich_help_panel=P_TARGET),
    model: Optional[str] = typer.Option(None, "--model", metavar="NAME", help="Model name to request (default: the first "
                                        "entry of /v1/models).", rich_help_panel=P_TARGET),
    endpoint: str = typer.Option("chat", "--endpoint", metavar="chat|completions", help="chat (/v1/chat/completions) or completions "
                                 "(/v1/completions).", rich_help_panel=P_TARGET),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", metavar="PATH", help="Directory or file with the model's "
                                            "tokenizer.json (or a hub id): sizes prompts exactly and "
                                            "recounts outputs. Without it lengths are approximate and "
                                            "counts come from the server's usage.", rich_help_panel=P_TARGET),
    api_key: Optional[str] = typer.Option(None, "--api-key", metavar="KEY", envvar=["DYNAMO_API_KEY", "OPENAI_API_KEY"],
                                          show_envvar=True, help="Bearer token: the key the frontend requires "
                                          "(its frontend.api_key).", rich_help_panel=P_TARGET),
    ready_timeout: float = typer.Option(120.0, "--ready-timeout", metavar="SECONDS", help="Seconds to wait for /v1/models and "
                                        "a one-token request to succeed before the load starts.",
                                        rich_help_panel=P_TARGET),
    concurrency: Optional[List[str]] = typer.Option(None, "--concurrency", "-c", metavar="N[,N...]", help="Closed loop: this many "
                                                    "users, each sending its next request when the last one "
                                                    "finishes. A list (1,2,4 or 1 2 4) is a sweep.",
                                                    rich_help_panel=P_LOAD),
    request_rate: Optional[List[str]] = typer.Option(None, "--request-rate", metavar="RATE[,RATE...]", help="Open loop: arrivals per "
                                                     "second (inf = all at once). A list is a sweep.",
                                                     rich_help_panel=P_LOAD),
    burstiness: float = typer.Option(1.0, "--burstiness", help="Gamma shape of inter-arrival times: 1 = "
                                     "Poisson, <1 burstier, >1 more regular, inf = constant gaps.", rich_help_panel=P_LOAD),
    max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency", min=1, help="Cap on requests in "
                                                  "flight with --request-rate (queued arrivals show as "
                                                  "schedule lag; there is no catch-up).",
                                                  rich_help_panel=P_LOAD),
    num_requests: Optional[int] = typer.Option(None, "--num-requests", "-n", min=1, help="Measured requests "
                                               "per load point (default: max(100, 10 x concurrency or "
                                               "rate); a whole trace).", rich_help_panel=P_LOAD),
    duration: Optional[str] = typer.Option(None, "--duration", metavar="DURATION", help="Send for this long per load point "
                                           "(30s, 2m); in-flight requests then get --grace-period.",
                                           rich_help_panel=P_LOAD),
    warmup: int = typer.Option(0, "--warmup", min=0, help="Requests sent before each load point and "
                               "excluded from the results.", rich_help_panel=P_LOAD),
    grace_period: float = typer.Option(30.0, "--grace-period", min=0, metavar="SECONDS", help="With --duration: seconds to let "
                                       "in-flight requests finish before they are cancelled (and "
                                       "excluded).", rich_help_panel=P_LOAD),
    timeout: float = typer.Option(600.0, "--timeout", min=0.1, metavar="SECONDS", help="Per-request read timeout in seconds.",
                                  rich_help_panel=P_LOAD),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for prompts, lengths and arrivals (default: a "
                                       "new one per run, recorded in the results: the same prompts twice would "
                                       "hit the server's prefix cache).", rich_help_panel=P_LOAD),
    workload: Optional[str] = typer.Option(None, "--workload", "-w", metavar="KIND", help="synthetic (default), shared-prefix, "
                                           "multi-turn, sharegpt or trace (mooncake JSONL). Inferred from "
                                           "--dataset when omitted.", rich_help_panel=P_WORK),
    dataset: Optional[Path] = typer.Option(None, "--dataset", metavar="FILE", help="ShareGPT JSON file or mooncake trace "
                                           "JSONL.", rich_help_panel=P_WORK),
    input_len: int = typer.Option(512, "--input-len", min=1, metavar="N", help="Prompt tokens (synthetic; per "
                                  "question for shared-prefix; per user turn for multi-turn).", rich_help_panel=P_WORK),
    input_len_std: float = typer.Option(0.0, "--input-len-std", min=0, metavar="N", help="Standard deviation "
                                        "of --input-len (normal, clipped at 1).", rich_help_panel=P_WORK),
    output_len: Optional[int] = typer.Option(None, "--output-len", min=1, metavar="N", help="Output tokens asked "
                                             "for (default 128; for sharegpt: the reference reply's length).",
                                             rich_help_panel=P_WORK),
    output_len_std: float = typer.Option(0.0, "--output-len-std", min=0, metavar="N", help="Standard deviation "
                                         "of --output-len.", rich_help_panel=P_WORK),
    prefix_groups: int = typer.Option(8, "--prefix-groups", min=1, metavar="N", help="shared-prefix: number of "
                                      "groups.", rich_help_panel=P_WORK),
    prompts_per_group: int = typer.Option(16, "--prompts-per-group", min=1, metavar="N", help="shared-prefix: "
                                          "prompts per group.", rich_help_panel=P_WORK),
    shared_prefix_len: int = typer.Option(1024, "--shared-prefix-len", min=0, metavar="N", help="shared-prefix: "
                                          "tokens shared by a group.", rich_help_panel=P_WORK),
    turns: int = typer.Option(4, "--turns", min=1, metavar="N", help="multi-turn: user turns per conversation "
                              "(each carries the whole history; --request-rate then starts conversations).",
                              rich_help_panel=P_WORK),
    turn_delay: float = typer.Option(0.0, "--turn-delay", min=0, metavar="SEC", help="multi-turn: seconds "
                                     "between a reply and the next turn.", rich_help_panel=P_WORK),
    trace_block_size: int = typer.Option(512, "--trace-block-size", min=1, metavar="N", help="trace: tokens per "
                                         "hash id.", rich_help_panel=P_WORK),
    trace_speedup: float = typer.Option(1.0, "--trace-speedup", metavar="FACTOR", help="trace: replay this many "
                                        "times faster.", rich_help_panel=P_WORK),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Stream responses (needed for TTFT and "
                                "ITL).", rich_help_panel=P_WORK),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--no-ignore-eos", help="Send ignore_eos and "
                                    "min_tokens so outputs have the asked length (vLLM, SGLang, the mocker).",
                                    rich_help_panel=P_WORK),
    extra_body: Optional[str] = typer.Option(None, "--extra-body", metavar="JSON", help="Extra fields merged "
                                             "into every request body.", rich_help_panel=P_WORK),
    goodput: Optional[List[str]] = typer.Option(None, "--goodput", metavar="METRIC:MS", help="SLOs for goodput, "
                                                "e.g. --goodput ttft:200 tpot:50 (metrics: ttft, tpot, e2el, "
                                                "itl).", rich_help_panel=P_OUT),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", metavar="DIR", help="Write results.json, "
                                              "summary.csv, requests-<load>.jsonl and (sweeps) PNG plots "
                                              "here.", rich_help_panel=P_OUT),
    save_requests: bool = typer.Option(True, "--save-requests/--no-save-requests", help="Write per-request "
                                       "JSONL to --output-dir.", rich_help_panel=P_OUT),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots for sweeps to --output-dir.",
                               rich_help_panel=P_OUT),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of tables.",
                                 rich_help_panel=P_OUT),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Live progress on stderr "
                                  "(terminals only).", rich_help_panel=P_OUT),
) -> None:
    """Load-benchmark an OpenAI-compatible endpoint and report TTFT, ITL, TPOT, E2EL, throughput and goodput.

    Examples:
      dynamo bench --url http://127.0.0.1:8000 -c 1,4,16,64 --input-len 1024 --output-len 256 -o out/
      dynamo bench --url http://127.0.0.1:8000 --request-rate 20 --burstiness 0.5 --duration 60s
      dynamo bench --profile agg --serve-arg=--backend=mocker -c 8 --goodput ttft:200 tpot:50
      dynamo bench --url ... --dataset mooncake_trace.jsonl --trace-speedup 2
      dynamo bench compare out-a/ out-b/

    A readiness check (/v1/models, then a one-token request) runs before the load.
    Exit codes: 0 done (failed requests are reported, not fatal); 1 server not ready, a
    --profile run that failed after it started (its logs are kept), or every request failed;
    2 usage error, also when dynamo serve refuses the profile or a --serve-arg or finds a
    port taken, when the API key is missing or refused, when --model is not served, or when
    --url is not an http(s) URL with a host and a port from 1 to 65535 or does not answer in
    HTTP; 130, 143 or 129 when stopped by SIGINT (Ctrl-C), SIGTERM or SIGHUP (the terminal
    closed): a --profile run is stopped, and what was measured is kept (printed and written
    to --output-dir): the finished load points and, marked interrupted, the finished requests
    of the current one. A SIGHUP ignored at start (nohup) stays ignored.
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        code = _run(**{k: v for k, v in locals().items() if k != "ctx"})
    except UsageError as exc:
        _fail(str(exc), 2)
    raise typer.Exit(code)


def _run(**o) -> int:
    from dynamo.cli.app import make_console
    from dynamo.core.bench import workloads as wl
    from dynamo.core.bench.client import ServerNotReady, normalize_base_url
    from dynamo.core.bench.metrics import parse_goodput
    from dynamo.core.bench.report import LiveDisplay
    from dynamo.core.bench.runner import BenchInterrupted, BenchSettings, LiveStats, LoadPoint, run_async, run_benchmark
    from dynamo.core.bench.target import ServeFailed, ServedProfile

    if bool(o["url"]) == bool(o["profile"]):
        raise UsageError("give exactly one of --url URL or --profile PROFILE")
    if o["url"]:
        normalize_base_url(o["url"])  # a URL that cannot work is refused now, not after --ready-timeout
    if o["serve_args"] and not o["profile"]:
        raise UsageError("--serve-arg only applies with --profile")
    if o["endpoint"] not in ("chat", "completions"):
        raise UsageError(f"--endpoint must be chat or completions, not {o['endpoint']!r}")
    concurrencies = _split_list(o["concurrency"], "--concurrency", _concurrency)
    rates = _split_list(o["request_rate"], "--request-rate", _rate)
    if concurrencies and rates:
        raise UsageError("--concurrency and --request-rate are exclusive "
                         "(cap a rate with --max-concurrency)")
    if o["max_concurrency"] and not rates:
        raise UsageError("--max-concurrency applies to --request-rate; use --concurrency for a closed loop")
    if not o["burstiness"] > 0:
        raise UsageError("--burstiness must be greater than 0")
    duration = _duration(o["duration"])
    goodput = parse_goodput(o["goodput"] or [])
    extra = None
    if o["extra_body"]:
        try:
            extra = json.loads(o["extra_body"])
        except ValueError as exc:
            raise UsageError(f"--extra-body is not valid JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise UsageError("--extra-body must be a JSON object")

    kind = o["workload"]
    dataset: Optional[Path] = o["dataset"]
    if kind is None:
        kind = "synthetic"
        if dataset is not None:
            kind = "trace" if dataset.suffix == ".jsonl" else "sharegpt"
    kinds = ("synthetic", "shared-prefix", "multi-turn", "sharegpt", "trace")
    if kind not in kinds:
        raise UsageError(f"--workload must be one of {', '.join(kinds)}, not {kind!r}")
    if kind in ("sharegpt", "trace") and dataset is None:
        raise UsageError(f"--workload {kind} needs --dataset FILE")
    if dataset is not None and kind not in ("sharegpt", "trace"):
        raise UsageError(f"--dataset is for the sharegpt and trace workloads, not {kind}")
    if dataset is not None and not dataset.is_file():
        raise UsageError(f"--dataset {dataset}: no such file")
    if not o["trace_speedup"] > 0:
        raise UsageError("--trace-speedup must be greater than 0")

    tok = wl.load_tokenizer(o["tokenizer"])
    maker = wl.TextMaker(tok) if kind != "sharegpt" else None
    out_len = o["output_len"] or 128
    seed = o["seed"] if o["seed"] is not None else random.SystemRandom().randrange(2**31)
    if kind == "synthetic":
        workload = wl.SyntheticWorkload(maker, o["input_len"], out_len, o["input_len_std"], o["output_len_std"], seed)
    elif kind == "shared-prefix":
        workload = wl.SharedPrefixWorkload(maker, o["prefix_groups"], o["prompts_per_group"], o["shared_prefix_len"],
                                           o["input_len"], out_len, o["input_len_std"], o["output_len_std"], seed)
    elif kind == "multi-turn":
        workload = wl.MultiTurnWorkload(maker, o["turns"], o["input_len"], out_len, o["input_len_std"],
                                        o["output_len_std"], o["turn_delay"], seed)
    elif kind == "sharegpt":
        workload = wl.ShareGPTWorkload(dataset, tok, o["output_len"], seed)
    else:
        workload = wl.TraceWorkload(dataset, maker, o["trace_block_size"], o["trace_speedup"])

    if concurrencies:
        points = [LoadPoint(concurrency=c) for c in concurrencies]
    elif rates:
        points = [LoadPoint(request_rate=r, burstiness=o["burstiness"], max_concurrency=o["max_concurrency"])
                  for r in rates]
    elif kind == "trace":
        points = [LoadPoint(trace=True, max_concurrency=o["max_concurrency"])]
    else:
        points = [LoadPoint(concurrency=1)]

    err = make_console(stderr=True, highlight=False)
    out = make_console(highlight=False)
    if tok is None:
        err.print("note: no --tokenizer: prompt lengths are approximate and token counts come from the "
                  "server's usage only")
    config = {
        "url": o["url"], "profile": o["profile"], "model": o["model"], "endpoint": o["endpoint"],
        "stream": o["stream"], "ignore_eos": o["ignore_eos"], "tokenizer": tok.source if tok else None,
        "load": [p.describe() for p in points], "num_requests": o["num_requests"], "duration_s": duration,
        "warmup": o["warmup"], "timeout_s": o["timeout"], "seed": seed, "goodput_slos_ms": goodput or None,
        "extra_body": extra, **workload.describe(),
        "command": " ".join(["dynamo", "bench", *sys.argv[1:]]) if sys.argv else None,
    }
    settings = BenchSettings(num_requests=o["num_requests"], duration=duration, warmup=o["warmup"],
                             grace_period=o["grace_period"], seed=seed, turn_delay=o["turn_delay"])
    stats = LiveStats()
    display = LiveDisplay(stats, err, enabled=o["progress"])

    async def go(url: str):
        async with display:
            return await run_benchmark(
                url=url, model=o["model"], endpoint=o["endpoint"], stream=o["stream"], ignore_eos=o["ignore_eos"],
                extra_body=extra, api_key=o["api_key"], workload=workload, points=points, settings=settings,
                tokenizer=tok, goodput=goodput, timeout=o["timeout"], ready_timeout=o["ready_timeout"],
                stats=stats, on_point=display.point_done)

    served: Optional[ServedProfile] = None
    result = None
    failed = True  # a temporary run directory of --profile is kept (for its logs) only after a failure
    signals = _StopSignals()
    with signals:
        try:
            if o["profile"]:
                served = ServedProfile(o["profile"], o["serve_args"] or [],
                                       run_dir=(o["output_dir"] / "serve-run") if o["output_dir"] else None)
                err.print(f"serving {o['profile']} (run dir {served.run_dir}) ...")
                target = served.start()
                err.print(f"endpoint {target}")
            else:
                target = o["url"]
            try:
                result = run_async(signals.guard(go(target)))
            except BenchInterrupted as exc:  # a signal after something was measured: keep it
                result = exc.result
            finally:
                signals.loop_done()
            # every request failing is worth the served run's logs; an interruption is not
            failed = signals.received is None and not any(p.summary["completed"] for p in result.points)
        except (ServeFailed, ServerNotReady) as exc:
            _fail(str(exc), 1)
        except UsageError:
            failed = False  # the message says what to change; there is nothing to read in the logs
            raise
        except (_Interrupted, asyncio.CancelledError):
            if signals.received is None:
                raise
            failed = False
            name = signal.Signals(signals.received).name
            err.print(f"{name}: stopping the benchmark" + (" and the served run ..." if served else ""))
            _fail(f"interrupted by {name} before the benchmark finished (nothing was measured yet)",
                  128 + signals.received)
        finally:
            if served is not None:
                signals.hold("still stopping the served run (it stops every process of the run)")
                if signals.received is not None and result is not None:
                    err.print(f"{signal.Signals(signals.received).name}: stopping the served run ...")
                _stop_served(served, err, failed)
        signals.hold("still finishing (saving the results)")
        return _report(o, result, config, target, seed, signals.received, len(points), out, err)


def _report(o: dict, result, config: dict, target: str, seed: int, interrupted: Optional[int], planned: int,
            out, err) -> int:
    """Files, tables and the exit code of a finished (or interrupted) benchmark."""
    from dynamo.core.bench.report import point_table, result_to_dict, sweep_tables, write_outputs

    doc = result_to_dict(result, config)
    name = signal.Signals(interrupted).name if interrupted else None
    if name:
        complete = sum(1 for p in result.points if not p.summary.get("interrupted"))
        doc["interrupted"] = {"signal": name, "load_points_planned": planned, "load_points_completed": complete}
    written: list[Path] = []
    if o["output_dir"]:
        written = write_outputs(o["output_dir"], doc, result, o["save_requests"])
        if o["plots"] and len(result.points) > 1:
            from dynamo.core.bench.plots import write_plots

            written += write_plots(o["output_dir"], doc)
    if o["as_json"]:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        for p in result.points:
            for w in p.summary.get("warnings") or []:
                err.print(f"warning: {p.point.label}: {w}")
    else:
        out.print(f"model {result.server.model} at {target} ({o['endpoint']}, "
                  f"per-chunk usage {'yes' if result.server.continuous_usage else 'no'}, seed {seed})")
        for p in result.points:
            out.print(point_table(p))
        if len(result.points) > 1:
            for table in sweep_tables(doc["points"]):
                out.print(table)
        if written:
            out.print(f"wrote {quantity(len(written), 'file')} to {o['output_dir']}")
    if name:
        kept = f"{doc['interrupted']['load_points_completed']} of {quantity(planned, 'load point')} completed"
        partial = [p.point.label for p in result.points if p.summary.get("interrupted")]
        if partial:
            kept += f", and what {partial[0]} measured before it was cut short is kept, marked interrupted"
        if written:
            kept += f"; results in {o['output_dir']}"
        typer.secho(f"error: interrupted by {name} before the benchmark finished: {kept}", fg="red", err=True)
        return 128 + interrupted
    if not any(p.summary["completed"] for p in result.points):
        errors: dict[str, int] = {}
        for p in result.points:
            for k, v in p.summary["errors"].items():
                errors[k] = errors.get(k, 0) + v
        sent = sum(p.summary["requests"] + p.summary["cancelled"] for p in result.points)
        detail = next((r.error_detail for p in result.points for r in p.records if r.error_detail), "")
        typer.secho(f"error: every request failed ({quantity(sent, 'request')} sent: "
                    f"{', '.join(f'{k} {v}' for k, v in errors.items())})"
                    + (f": {detail}" if detail else ""), fg="red", err=True)
        return 1
    return 0


def _stop_served(served, err, failed: bool) -> None:
    """Stop the run of --profile; remove its temporary directory unless its logs may be needed."""
    warning = served.stop()
    if warning:
        err.print(f"warning: {warning}")
    if failed or warning:
        err.print(f"the served run's logs are in {served.run_dir / 'logs'} (dynamo logs {served.run_dir})")
    elif served.temporary:
        served.remove()


@app.command("compare")
def compare(
    dir_a: Path = typer.Argument(..., metavar="RUN_A", help="Output directory (or results.json) of run A."),
    dir_b: Path = typer.Argument(..., metavar="RUN_B", help="Output directory (or results.json) of run B."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print two benchmark results side by side with the ratio B/A, load point by load point."""
    from dynamo.cli.app import make_console
    from dynamo.core.bench.compare import compare_results, compare_tables

    try:
        data = compare_results(dir_a, dir_b)
    except UsageError as exc:
        _fail(str(exc), 2)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    console = make_console(highlight=False)
    for table in compare_tables(data):
        console.print(table)


if __name__ == "__main__":
    app()
