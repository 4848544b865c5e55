import sys

from dist_llama.train.cli import main

sys.exit(main())
