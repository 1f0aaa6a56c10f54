"""``python -m vm.image``: build the guest image and print its paths (vm/image/image.py)."""

import sys

from vm.image.image import main

sys.exit(main())
