"""Generate the built-in shapes dataset for the toy configs."""
from rest_mm.cli.make_toy_data import main

if __name__ == '__main__':
    main()
