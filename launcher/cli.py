"""The `deploy` command: validate, plan, up, bench.

Exit codes: 0 ok / the plan fits, 3 the plan does not fit, 2 a user mistake (one line on stderr,
never a traceback). `deploy plan` imports no torch (tests/test_cli_plan.py checks it).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import typer

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Declarative LLM deployment: validate a YAML profile, plan its memory, "
                       "serve it.")

EXIT_FITS, EXIT_USER_ERROR, EXIT_DOES_NOT_FIT = 0, 2, 3

SET_HELP = "Override a profile key, e.g. --set max_model_len=8192 (repeatable)."


# Environment switches the runtime reads, with their allowed values and what to do instead.
ENV_CHOICES = {
    "PAGEDEPLOY_PDL": (("0", "1", "2"), "unset it, or 0 to turn programmatic dependent launch off"),
}


def check_environment() -> None:
    """A bad switch is a user mistake, reported before any work (the kernels would raise later)."""
    for name, (choices, fix) in ENV_CHOICES.items():
        value = os.environ.get(name)
        if value is not None and value not in choices:
            raise UserError(f"{name}={value!r} is not one of {', '.join(choices)}", fix)


def user_errors(command):
    """Every UserError becomes one line on stderr and exit code 2."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            check_environment()
            return command(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e.one_line()}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
    return wrapper


def load(profile_path: str, overrides: list[str] | None):
    """Profile and its ModelSpec; missing weights are a note (in profile.warnings), not an error.
    Warnings are printed by the command once it succeeds, so that an error stays one line."""
    from .model_resolve import resolve_model
    from .profile import load_profile

    profile = load_profile(profile_path, overrides or [])
    try:
        spec = resolve_model(profile)
    except UserError as strict:
        spec = resolve_model(profile, need_weights=False)   # a plan needs only the facts
        profile.warnings.append(f"note: {strict.what}; deploy up needs that: {strict.fix}")
    return profile, spec


def print_warnings(profile) -> None:
    for line in profile.warnings:
        typer.echo(line, err=True)


@app.command()
@user_errors
def validate(profile: str = typer.Argument(..., help="YAML profile"),
             set_: list[str] = typer.Option(None, "--set", help=SET_HELP)):
    """Check a profile against the schema and the model; exit 0 when it is valid."""
    from .gpus import lookup_gpu
    from .profile import check_against_model

    prof, spec = load(profile, set_)
    max_model_len = check_against_model(prof, spec.max_position_embeddings, spec.name)
    if prof.gpu:
        lookup_gpu(prof.gpu)
    print_warnings(prof)
    typer.echo(f"ok: {prof.path} is valid: {spec.name} ({spec.source}, {spec.architecture}), "
               f"max_model_len {max_model_len}, device {prof.device}")


@app.command()
@user_errors
def plan(profile: str = typer.Argument(..., help="YAML profile"),
         json_: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
         gpu: str = typer.Option(None, "--gpu", help="Plan for this GPU (e.g. h100-80gb), "
                                 "no GPU needed."),
         set_: list[str] = typer.Option(None, "--set", help=SET_HELP)):
    """Dry-run memory plan: exit 0 when it fits, 3 when it does not."""
    from .gpus import resolve_target
    from .plan import plan as make_plan

    prof, spec = load(profile, set_)
    target = resolve_target(prof, gpu)
    if gpu:   # the what-if GPU is what the settings show
        prof = dataclasses.replace(prof, gpu=target.name, explicit=prof.explicit | {"gpu"})
    result = make_plan(prof, spec, target)
    print_warnings(prof)
    if json_:
        from .plan_report import plan_to_json
        typer.echo(json.dumps(plan_to_json(result, prof, spec), indent=2))
    else:
        from .plan_report import print_plan
        print_plan(result, prof, spec)
    raise typer.Exit(EXIT_FITS if result.fits else EXIT_DOES_NOT_FIT)


@app.command()
@user_errors
def up(profile: str = typer.Argument(..., help="YAML profile"),
       host: str = typer.Option(None, "--host", help="Override the profile's host."),
       port: int = typer.Option(None, "--port", help="Override the profile's port."),
       set_: list[str] = typer.Option(None, "--set", help=SET_HELP)):
    """Plan, load the model, allocate the planned KV pool and serve the OpenAI API."""
    from pagedeploy.launcher.up import run_up

    code = run_up(profile, host, port, list(set_ or []))
    raise typer.Exit(code or 0)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def bench(ctx: typer.Context, profile: str = typer.Argument(..., help="YAML profile")):
    """Benchmark a profile (options are those of pagedeploy.launcher.bench)."""
    from pagedeploy.launcher.bench import run_bench

    code = run_bench(profile, list(ctx.args))
    raise typer.Exit(code or 0)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
