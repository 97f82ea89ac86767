"""`python -m weightsmith_server`: same as the `weightsmith-server` command."""

from weightsmith_server.app import main

if __name__ == "__main__":
    main()
