from capfilt.cli.main import main

main()
