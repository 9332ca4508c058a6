"""User-facing errors: raised where a problem is detected, printed as one line by the CLIs."""


class UserError(Exception):
    """A problem with the user's input (config, paths, data, checkpoints, flags).

    The CLI prints ``error: <message>`` and exits with code 2, without a traceback, so the
    message must name the problem and say what to do about it.
    """
