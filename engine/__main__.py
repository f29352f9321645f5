import sys

from engine.cli import main

# main() run as the program flushes and leaves through os._exit (see there): no interpreter teardown.
sys.exit(main())
