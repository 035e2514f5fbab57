import sys

from negprep.cli import main

sys.exit(main())
