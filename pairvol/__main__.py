import sys

from pairvol.cli import main

sys.exit(main())
