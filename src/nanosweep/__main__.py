from nanosweep.cli.main import main

main()
