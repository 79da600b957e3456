"""Generated C kernels for CPU (the dispatcher's "cpu" path): sequential linear recurrences
(seqfuse::scan, and seqfuse::ssd's recurrent algorithm), compiled at run time with the system
C compiler, loaded with ctypes and cached on disk (build.py).  Importing this package
registers them; a call they cannot run (no compiler, complex, too large a state) is refused
by their ``supports`` with the reason, and the next path runs it."""
from seqfuse.lowering.cpu import scan, ssd

scan.register()
ssd.register()
