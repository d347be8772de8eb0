import sys

from tsunagu.stack.cli import main

raise SystemExit(main(sys.argv[1:]))
