from nanosweep.cli import main

main()
