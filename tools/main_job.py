"""The main job (make demo): RetinaNet-ResT-Small learns the shapes data on CPU."""
import sys

from rest_mm.cli.main_job import main

if __name__ == '__main__':
    sys.exit(0 if main() else 1)
