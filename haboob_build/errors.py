"""The one exception a build step raises for bad input or a failed tool."""


class BuildError(Exception):
    """A clear, one-line reason the build cannot go on (shown without a traceback)."""
