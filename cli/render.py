"""``dynamo render``: the same profile for Kubernetes or Slurm."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dynamo.cli.helptext import BACKEND_METAVAR, BACKEND_NAMES

render_app = typer.Typer(help="Render a profile for a cluster scheduler (Kubernetes, Slurm).", no_args_is_help=True)


@render_app.command("k8s")
def k8s(
    profile: str = typer.Argument(..., help="Profile file or shipped profile name."),
    image: str = typer.Option(..., "--image", help="Container image with dynamo and the engine installed."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY.PATH=VALUE", help="Override a profile value."),
    backend: Optional[str] = typer.Option(None, "--backend", metavar=BACKEND_METAVAR, help="Replace the profile's backend (" + BACKEND_NAMES + ")."),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="Kubernetes namespace for every object."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE", help="Write here instead of stdout."),
) -> None:
    """Kubernetes manifests: NATS, a Deployment per frontend/router, a StatefulSet per worker group.

    Each pod runs `dynamo serve PROFILE --node COMPONENT` (workers add `--replica` from the
    pod ordinal), so probes, restarts and discovery match a single machine. Worker pods
    request `nvidia.com/gpu`; components placed on profile nodes get a nodeSelector
    `dynamo.dev/node: NAME` (label your nodes to match). Apply with `kubectl apply -f`.
    """
    from dynamo.cli.app import user_errors, write_output
    from dynamo.core.profile import load_profile
    from dynamo.core.render import render_kubernetes, to_yaml_stream, token_secret_command

    @user_errors
    def run() -> None:
        loaded = load_profile(profile, overrides or [], backend=backend)
        write_output(to_yaml_stream(render_kubernetes(loaded, image, namespace)), output)
        create = token_secret_command(loaded.profile, namespace)
        if create:
            typer.echo(f"NATS takes a token from a Secret these manifests do not hold; create it first:\n  {create}",
                       err=True)

    run()


@render_app.command("slurm")
def slurm(
    profile: str = typer.Argument(..., help="Profile file (the path the job will read) or shipped profile name."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY.PATH=VALUE", help="Override a profile value."),
    partition: Optional[str] = typer.Option(None, "--partition", "-p", help="Slurm partition (#SBATCH --partition)."),
    time_limit: Optional[str] = typer.Option(None, "--time", "-t", help="Slurm time limit, e.g. 04:00:00."),
    account: Optional[str] = typer.Option(None, "--account", "-A", help="Slurm account to charge (#SBATCH --account)."),
    backend: Optional[str] = typer.Option(None, "--backend", metavar=BACKEND_METAVAR, help="Replace the profile's backend (" + BACKEND_NAMES + ") on every node."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE", help="Write here instead of stdout."),
) -> None:
    """An sbatch script: one host per profile node, `dynamo serve --node` on each with srun.

    Every node is told every node's address (`--set nodes.NAME.address=IP`), so NATS on the
    head is reached by the others; the first node hosts what the profile puts on its first node.
    """
    from dynamo.cli.app import user_errors, write_output
    from dynamo.core.profile import load_profile
    from dynamo.core.render import render_slurm

    @user_errors
    def run() -> None:
        loaded = load_profile(profile, overrides or [], backend=backend)
        write_output(render_slurm(loaded, str(loaded.path), overrides or [], partition, time_limit, account), output)

    run()
