from capfilt.cli.main import main

if __name__ == "__main__":  # not when a loader worker process imports it
    main()
