import sys

from eclm.cli import main

sys.exit(main())
