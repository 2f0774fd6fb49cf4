"""``python -m ttreg`` runs the command line (Ctrl-C during start-up ends as one line, 130)."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:
    print("ttreg: interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
