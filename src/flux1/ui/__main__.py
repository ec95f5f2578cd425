import sys

from flux1.ui.cli import main

sys.exit(main())
