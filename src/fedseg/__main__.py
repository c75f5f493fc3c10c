"""``python -m fedseg``: the ``fedseg`` command, also what local mode starts for its server and site processes."""

from fedseg.cli.main import main

main()
