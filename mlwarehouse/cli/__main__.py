"""``python -m mlwarehouse.cli``: the same as ``mlw``."""

from mlwarehouse.cli.main import main

main()
