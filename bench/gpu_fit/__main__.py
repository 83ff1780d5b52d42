import sys

from bench.gpu_fit.cli import main

sys.exit(main())
