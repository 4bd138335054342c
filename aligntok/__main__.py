"""`python -m aligntok`: the same CLI as the `aligntok` script, for environments where only the interpreter is on PATH."""
import sys

from aligntok.cli import main

sys.exit(main())
