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
(``UNIMO_BIDS_NIPYPE_LOG_LEVEL``). Imported anywhere else, this module does nothing.
"""

import errno
import os
import signal
import sys

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

    _NIPYPE_LEVEL = os.environ.get("UNIMO_BIDS_NIPYPE_LOG_LEVEL")
    if _NIPYPE_LEVEL:
        from nipype import config as _config
        from nipype import logging as _nipype_logging

        _config.update_config({"logging": {"workflow_level": _NIPYPE_LEVEL,
                                           "interface_level": _NIPYPE_LEVEL,
                                           "utils_level": _NIPYPE_LEVEL}})
        _nipype_logging.update_logging(_config)
