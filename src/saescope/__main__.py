"""`python -m saescope ...` (and `torchrun ... -m saescope ...`): the same as the `saescope` command."""

from .cli import main

main()
