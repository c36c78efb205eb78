import sys

from uniemo.cli import main

sys.exit(main())
