"""Evaluate a trained detector or segmentor on its config's test set."""
from rest_mm.cli.test import main

if __name__ == '__main__':
    main()
