"""Preloaded by the forkserver that starts nipype's MultiProc workers, so that the workers
ignore SIGINT.

Ctrl-C sends SIGINT to the whole process group. The main process alone should answer it: it
unwinds, leaves nothing half-written, and exits with code 130. Without this module, every
worker would also print its own KeyboardInterrupt traceback. The forkserver hands its SIGINT
disposition on to the workers it forks (``multiprocessing.forkserver.main`` records it after
the preload). Imported anywhere else, this module does nothing.
"""

import os
import signal

if os.environ.get("UNIMO_BIDS_FORKSERVER") == "1":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
