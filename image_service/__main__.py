import sys

from image_service.server import main

sys.exit(main())
