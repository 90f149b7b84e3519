from ctxedit.cli import main

main()
