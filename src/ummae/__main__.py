import sys

from ummae.cli import main

sys.exit(main())
