"""`python -m ctxedit`, as launchers need it: torchrun --nproc-per-node 2 -m ctxedit batch PRESET.yaml."""

from ctxedit.cli import main

main()
