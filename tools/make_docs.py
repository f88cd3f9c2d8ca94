"""Write the generated tables of README.md and docs/*.md (``make docs``)."""
from rest_mm.cli.make_docs import main

if __name__ == '__main__':
    main()
