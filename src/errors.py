"""The one exception type for mistakes a user can make (bad config, missing file, ...).

Command-line entry points print its message without a traceback and exit with status 2.
"""


class SLMError(Exception):
    """An error the user can fix; the message says what is wrong and how to fix it."""


class ConfigError(SLMError):
    """A config file or override that does not validate; lists every problem at once."""


class Interrupted(SLMError):
    """SIGTERM/SIGINT arrived and a checkpoint was saved; `signum` says which (exit 128+signum)."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum


def record_error(message: str) -> None:
    """Append an error line to $SLM_ERROR_FILE when set: the Modal launcher reads it to tell a
    failure a retry would repeat (reported once) from one a retry can fix (retried)."""
    import os

    path = os.environ.get("SLM_ERROR_FILE")
    if path:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(message.replace("\n", " ") + "\n")
        except OSError:
            pass
