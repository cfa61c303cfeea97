"""`python -m appliance ...`: the appliance's command line (host side).

Each subcommand lives with the layer it belongs to and is imported lazily,
so `--help` is fast and a layer's import errors stay with that layer. The
image's PID 1 (`appliance.init`) does not use this module or click.
"""
import importlib

import click

# name -> "module:attribute" of a click command
COMMANDS = {
    "compile": "appliance.content.cli:compile_cmd",
    "inspect": "appliance.content.cli:inspect_cmd",
    "respond": "appliance.http.cli:respond_cmd",
    "serve": "appliance.stack.cli:serve_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Haboob appliance tools: compile a site, inspect a store, see what the
    appliance answers, serve a site on a network interface."""


if __name__ == "__main__":
    cli(prog_name="python -m appliance")
