"""click options for the observability settings (appliance/obs/options.py), shared by
`appliance serve` and build.py. Host-side only (click is not in the image)."""
import click

from .options import DEFAULTS

__all__ = ["obs_options", "obs_settings"]


def obs_options(f):
    """Adds --access-log, --log-format, --log-sample, --syslog-framing, --metrics-port,
    --metrics-allow, --drain-timeout to a click command."""
    opts = [
        click.option("--access-log", "access_log", default=DEFAULTS["access_log"], show_default=True,
                     metavar="off|console|syslog://ADDR[:PORT]", help="Where the access log goes."),
        click.option("--log-format", "log_format", default=DEFAULTS["log_format"], show_default=True,
                     type=click.Choice(["combined", "json"]), help="Access log line format."),
        click.option("--log-sample", "log_sample", default=DEFAULTS["log_sample"], show_default=True,
                     type=click.IntRange(min=1), metavar="N", help="Log 1 response in N."),
        click.option("--syslog-framing", "syslog_framing", default=DEFAULTS["syslog_framing"],
                     show_default=True, type=click.Choice(["rfc5424", "rfc3164"]), help="Syslog message form."),
        click.option("--metrics-port", "metrics_port", default=DEFAULTS["metrics_port"], show_default=True,
                     type=click.IntRange(0, 65535), metavar="N",
                     help="Port of /metrics and /healthz (0: off; e.g. 9100)."),
        click.option("--metrics-allow", "metrics_allow", default=DEFAULTS["metrics_allow"],
                     metavar="PREFIX[,PREFIX...]", help="Sources allowed on the metrics port (default: any)."),
        click.option("--drain-timeout", "drain", default=DEFAULTS["drain"], show_default=True,
                     type=click.FloatRange(0, 3600), metavar="SECONDS",
                     help="On SIGTERM, finish responses for up to this long (0: stop at once)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def obs_settings(kwargs: dict) -> dict:
    """Pops the options' values out of a command's kwargs; the validated settings dict.
    click.BadParameter names what is wrong."""
    from .options import check
    s = {k: kwargs.pop(k) for k in list(DEFAULTS) if k in kwargs}
    try:
        return check(s)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
