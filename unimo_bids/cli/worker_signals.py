"""Preloaded by the forkserver that starts nipype's MultiProc workers, so that the workers
ignore SIGINT and log at the run's nipype level.

Ctrl-C sends SIGINT to the whole process group. The main process alone should answer it: it
unwinds, leaves nothing half-written, and exits with code 130. Without this module, every
worker would also print its own KeyboardInterrupt traceback. The forkserver hands its SIGINT
disposition on to the workers it forks (``multiprocessing.forkserver.main`` records it after
the preload). The server also exits without a traceback when the main process is gone.
The workers are forked from the server, not from the main process, so they would log at
nipype's default level (INFO: every node's set-up, execution and end, across the progress
bar) whatever ``-v`` asked for; the server applies the level the main process chose
(``UNIMO_BIDS_NIPYPE_LOG_LEVEL``) with :func:`set_nipype_log_level`, which the main process
uses too. Imported anywhere else, this module only defines that function.
"""

import errno
import os
import signal
import sys

NIPYPE_LEVEL_VARIABLE = "UNIMO_BIDS_NIPYPE_LOG_LEVEL"


def set_nipype_log_level(level: str) -> None:
    """nipype's workflow, interface and utils loggers at ``level`` (e.g. "INFO")."""
    from nipype import config
    from nipype import logging as nipype_logging

    config.update_config({"logging": {"workflow_level": level, "interface_level": level,
                                      "utils_level": level}})
    nipype_logging.update_logging(config)


if os.environ.get("UNIMO_BIDS_FORKSERVER") == "1":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _SERVER_PID = os.getpid()
    _default_hook = sys.excepthook

    def _quiet_when_the_main_process_is_gone(kind, value, traceback):
        # An interrupted main process closes its socket while the server waits on it: the
        # server's loop ends in EOFError or EBADF, whose traceback would follow the line that
        # says the run was interrupted. Only the server itself, and only those, are quiet.
        gone = issubclass(kind, EOFError) or (issubclass(kind, OSError)
                                              and value.errno == errno.EBADF)
        if not (gone and os.getpid() == _SERVER_PID):
            _default_hook(kind, value, traceback)

    sys.excepthook = _quiet_when_the_main_process_is_gone

    if os.environ.get(NIPYPE_LEVEL_VARIABLE):
        set_nipype_log_level(os.environ[NIPYPE_LEVEL_VARIABLE])
