"""User-facing errors: raised where a problem is detected, printed as one line by the CLIs."""


class UserError(Exception):
    """A problem with the user's input (config, paths, data, checkpoints, flags).

    The CLI prints ``error: <message>`` and exits with code 2, without a traceback, so the
    message must name the problem and say what to do about it.
    """


def run_cli(work):
    """Run a command's work; a ``UserError`` becomes one ``error: ...`` line and exit code 2,
    Ctrl-C exit code 130 (the work writes atomically, so nothing half-written is left).

    Returns ``(exit code, the work's result or None)``.
    """
    import sys

    try:
        return 0, work()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130, None
