"""Time backbones or whole models: latency, throughput, peak memory."""
from rest_mm.cli.benchmark import main

if __name__ == '__main__':
    main()
