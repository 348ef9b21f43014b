import sys

from edgedeploy.launcher import main

sys.exit(main())
